"""The .deb packages the system test installs: the freshly built one and an upgrade of it.

Both are built from the tree under test by scripts/build-packages.sh (packaging/README.md: build
type None with Debian's flags, prefix /usr, CPack) in TB_BUILD_DIR/systest-pkg: first as the
project's version, then reconfigured with -DTB_VERSION_OVERRIDE=<patch + 1> as the upgrade (a
real rebuild; only what embeds the version recompiles). TB_DEB=/path/to.deb installs a given
package instead, upgraded by a repack of it with a higher version (dpkg-deb: same files and
maintainer scripts; `tb-agent --version` then still prints the old version).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path


class PackageError(RuntimeError):
    pass


def _run(argv, log, **kw):
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(map(str, argv)) + "\n").encode())
        out.flush()
        r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        raise PackageError(f"{' '.join(map(str, argv))} failed ({r.returncode}); see {log}")


def _build_with_script(source_dir, pkg_build, out, log, version_override):
    argv = ["bash", str(Path(source_dir) / "scripts" / "build-packages.sh"), str(pkg_build),
            f"-DTB_VERSION_OVERRIDE={version_override}"]
    if shutil.which("ccache"):
        argv += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_C_COMPILER_LAUNCHER=ccache"]
    for old in Path(pkg_build).glob("tb-agent_*.deb"):
        old.unlink()
    _run(argv, log, timeout=1800, env=dict(os.environ, TB_PACKAGE_GENERATORS="DEB"))
    debs = sorted(Path(pkg_build).glob("tb-agent_*.deb"))
    if len(debs) != 1:
        raise PackageError(f"expected one tb-agent_*.deb in {pkg_build}, found {debs}; see {log}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(debs[0], out)
    return out


def build_debs(build_dir, source_dir, out_dir, log):
    """Return (first.deb, upgrade.deb, upgrade version)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if os.environ.get("TB_DEB"):
        first = Path(os.environ["TB_DEB"])
        second, version = upgrade_by_repack(first, out_dir, log)
        return first, second, version
    script = Path(source_dir) / "scripts" / "build-packages.sh"
    if not script.exists():
        raise PackageError(f"{script} is missing: this tree cannot build its package")
    pkg_build = Path(build_dir) / "systest-pkg"
    first = _build_with_script(source_dir, pkg_build, out_dir / "first.deb", log, "")
    base = deb_field(first, "Version")
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", base)
    if not m:
        raise PackageError(f"cannot derive a higher version from {base!r}")
    version = f"{m[1]}.{m[2]}.{int(m[3]) + 1}"
    second = _build_with_script(source_dir, pkg_build, out_dir / "upgrade.deb", log, version)
    if deb_field(second, "Version") != version:
        raise PackageError(f"TB_VERSION_OVERRIDE={version} built {deb_field(second, 'Version')}")
    return first, second, version


def deb_field(deb, field):
    return subprocess.run(["dpkg-deb", "--field", str(deb), field], check=True,
                          capture_output=True, text=True).stdout.strip()


def upgrade_by_repack(deb, out_dir, log, suffix="+systest1"):
    """The same package with a higher version; returns (path, version)."""
    out_dir = Path(out_dir)
    tree = out_dir / "upgrade-tree"
    if tree.exists():
        shutil.rmtree(tree)
    out_dir.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], log)
    control = tree / "DEBIAN" / "control"
    old = deb_field(deb, "Version")
    new = old + suffix
    text = control.read_text()
    control.write_text(re.sub(r"^Version: .*$", f"Version: {new}", text, count=1, flags=re.M))
    out = out_dir / f"tb-agent_{new}_{deb_field(deb, 'Architecture')}.deb"
    _run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(out)], log)
    shutil.rmtree(tree)
    return out, new
