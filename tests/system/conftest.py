import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import container as ct  # noqa: E402
import packages  # noqa: E402


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason):
    """Skip when a prerequisite is missing, except in CI: there it was installed on purpose, so
    a missing one is a broken CI and must fail loudly instead of passing as 'skipped'."""
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def build_dir():
    d = os.environ.get("TB_BUILD_DIR")
    if not d:
        unavailable("TB_BUILD_DIR is not set (run through ctest)")
    return Path(d)


def source_dir():
    return Path(os.environ.get("TB_SOURCE_DIR", Path(__file__).resolve().parents[2]))


@pytest.fixture(scope="session")
def prerequisites():
    if os.geteuid() != 0:
        unavailable("needs root (debootstrap, systemd-nspawn)")
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "dpkg-deb", "dpkg-buildflags", "cpack"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} is not installed (scripts/install-deps.sh installs it)")


@pytest.fixture(scope="session")
def workdir(prerequisites):
    """Per-run files, kept after the run for a look at the logs (console, package build)."""
    d = build_dir() / "systest"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def pristine_root(workdir):
    started = time.monotonic()
    try:
        root = ct.ensure_root(log=workdir / "debootstrap.log")
    except ct.ContainerError as e:
        pytest.fail(f"cannot make the Debian 12 root: {e}", pytrace=False)
    took = time.monotonic() - started
    if took > 5:
        print(f"\ndebootstrapped {root} in {took:.0f}s")
    return root


@pytest.fixture(scope="session")
def debs(workdir):
    """(first.deb, upgrade.deb, upgrade version)."""
    log = workdir / "package.log"
    log.unlink(missing_ok=True)
    try:
        first, second, version = packages.build_debs(build_dir(), source_dir(),
                                                     workdir / "debs", log)
    except packages.PackageError as e:
        pytest.fail(f"cannot build the package: {e}", pytrace=False)
    return first, second, version
