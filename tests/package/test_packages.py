# ctest-labels: package
"""The .deb and .rpm built by CPack from the build directory (packaging/README.md): contents,
modes, conffiles, computed dependencies, maintainer scripts, the version, lintian and rpmlint,
and an rpm install into an empty root. The life cycle in a booted systemd (install, upgrade,
remove, purge) is the systest's.

Needs a build configured with -DCMAKE_INSTALL_PREFIX=/usr (scripts/test.sh does) and the tools
dpkg-deb, lintian, rpm, rpmbuild, rpmlint (scripts/install-deps.sh)."""
import gzip
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

BUILD = Path(os.environ["TB_BUILD_DIR"])
SRC = Path(os.environ["TB_SOURCE_DIR"])
STATIC_CXX = os.environ.get("TB_STATIC_CXX", "ON").upper() in ("ON", "1", "TRUE", "YES")

# path -> mode, in both packages (the config's group is checked per format).
FILES = {
    "/usr/bin/tb-agent": 0o755,
    "/usr/lib/systemd/system/tb-agent.service": 0o644,
    "/usr/lib/sysusers.d/tb-agent.conf": 0o644,
    "/usr/share/dbus-1/system.d/io.tbagent.Agent1.conf": 0o644,
    "/usr/share/dbus-1/interfaces/io.tbagent.Agent1.xml": 0o644,
    "/etc/tb-agent.yaml": 0o640,
    "/usr/share/man/man8/tb-agent.8.gz": 0o644,
    "/usr/share/doc/tb-agent/README.md": 0o644,
    "/usr/share/doc/tb-agent/configuration.md": 0o644,
    "/usr/share/doc/tb-agent/service.md": 0o644,
    "/usr/share/doc/tb-agent/dbus.md": 0o644,
    "/usr/share/doc/tb-agent/changelog.gz": 0o644,
    "/usr/share/doc/tb-agent/copyright": 0o644,
    "/usr/share/doc/tb-agent/dashboard.md": 0o644,
    "/usr/share/tb-agent/dashboards/system.json": 0o644,
}
if (SRC / "docs/man/tb-agent.yaml.5").exists():
    FILES["/usr/share/man/man5/tb-agent.yaml.5.gz"] = 0o644


def run(*cmd, ok=True, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    if ok:
        assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def project_version():
    cache = (BUILD / "CMakeCache.txt").read_text()
    m = re.search(r"^CMAKE_PROJECT_VERSION:STATIC=(\S+)$", cache, re.M)
    assert m, "no CMAKE_PROJECT_VERSION in CMakeCache.txt"
    return m.group(1)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    out = tmp_path_factory.mktemp("packages")
    for generator in ("DEB", "RPM"):
        run("cpack", "-G", generator, "-B", out, "--config", BUILD / "CPackConfig.cmake")
    debs = list(out.glob("*.deb"))
    rpms = list(out.glob("*.rpm"))
    assert len(debs) == 1 and len(rpms) == 1, sorted(p.name for p in out.iterdir())
    return {"deb": debs[0], "rpm": rpms[0], "dir": out}


@pytest.fixture(scope="module")
def deb_tree(packages, tmp_path_factory):
    root = tmp_path_factory.mktemp("deb-tree")
    run("dpkg-deb", "-x", packages["deb"], root)
    control = tmp_path_factory.mktemp("deb-control")
    run("dpkg-deb", "-e", packages["deb"], control)
    return root, control


def deb_field(deb, name):
    return run("dpkg-deb", "-f", deb, name).stdout.strip()


# --- names and version ---------------------------------------------------------------------------

def test_file_names_carry_version_and_architecture(packages):
    v = project_version()
    arch = run("dpkg", "--print-architecture").stdout.strip()
    rpm_arch = run("rpm", "--eval", "%{_arch}").stdout.strip()
    assert packages["deb"].name == f"tb-agent_{v}_{arch}.deb"
    assert packages["rpm"].name == f"tb-agent-{v}-1.{rpm_arch}.rpm"


def test_agent_version_is_the_package_version(packages, deb_tree):
    root, _ = deb_tree
    v = project_version()
    assert deb_field(packages["deb"], "Version") == v
    assert run("rpm", "-qp", "--qf", "%{VERSION}", packages["rpm"]).stdout == v
    out = run(root / "usr/bin/tb-agent", "--version").stdout.strip()
    assert out == f"tb-agent {v}"


def test_changelogs_name_the_version(deb_tree):
    root, _ = deb_tree
    if os.environ.get("TB_VERSION_OVERRIDE"):
        pytest.skip("a build with TB_VERSION_OVERRIDE has no changelog entry of its own")
    v = project_version()
    deb_top = gzip.decompress((root / "usr/share/doc/tb-agent/changelog.gz").read_bytes())
    assert deb_top.decode().startswith(f"tb-agent ({v}) ")
    rpm_top = (SRC / "packaging/rpm/changelog").read_text().splitlines()[0]
    assert rpm_top.endswith(f" - {v}-1"), rpm_top


# --- the .deb ------------------------------------------------------------------------------------

def test_deb_files_and_modes(packages):
    listing = run("dpkg-deb", "-c", packages["deb"]).stdout
    entries = {}
    for line in listing.splitlines():
        perms, owner, _size, _date, _time, name = line.split(None, 5)
        entries[name.lstrip(".").split(" -> ")[0]] = (perms, owner)
    for path, mode in FILES.items():
        assert path in entries, f"{path} not in the .deb"
        perms, owner = entries[path]
        assert perms == "-" + stat.filemode(mode)[1:], (path, perms)
        # dpkg knows only root-owned files; the postinst gives the config its group.
        assert owner == "root/root", (path, owner)
    # Nothing else but more user docs: no build paths, tests, headers or static libraries.
    files = {p for p, (perms, _) in entries.items() if not perms.startswith("d")}
    extra = files - set(FILES) - {"/usr/share/lintian/overrides/tb-agent"}
    assert all(re.fullmatch(r"/usr/share/doc/tb-agent/[\w.-]+\.md", p) for p in extra), extra


def test_deb_conffiles_is_the_config(deb_tree):
    _, control = deb_tree
    assert (control / "conffiles").read_text().split() == ["/etc/tb-agent.yaml"]


def test_deb_depends_are_computed_from_the_binary(packages):
    depends = deb_field(packages["deb"], "Depends")
    names = {d.strip().split()[0] for d in depends.split(",")}
    # dpkg-shlibdeps' names for the shared libraries tb-agent links (libcoap3 on Debian 12).
    assert any(n.startswith("libcoap") for n in names), depends
    assert {"libc6", "libsystemd0", "libsqlite3-0"} <= names, depends
    if STATIC_CXX:
        # Linked in (cmake/Footprint.cmake): no libstdc++6, libgcc-s1 or libyaml-cpp.
        assert not {n for n in names if re.match(r"libstdc\+\+|libgcc|libyaml-cpp", n)}, depends
    assert "systemd" in deb_field(packages["deb"], "Pre-Depends")


def test_deb_binary_is_stripped(deb_tree):
    root, _ = deb_tree
    sections = run("readelf", "-S", "-W", root / "usr/bin/tb-agent").stdout
    assert ".symtab" not in sections and ".debug_info" not in sections


def test_deb_maintainer_scripts(deb_tree):
    _, control = deb_tree
    for script in ("preinst", "postinst", "prerm", "postrm"):
        path = control / script
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, script
        run("sh", "-n", path)
        assert "@" not in re.sub(r"#.*", "", path.read_text()), f"unsubstituted in {script}"
    sysusers = (SRC / "systemd/tb-agent.sysusers").read_text().strip()
    assert sysusers in (control / "preinst").read_text()
    postinst = (control / "postinst").read_text()
    assert "deb-systemd-helper enable 'tb-agent.service'" in postinst
    assert re.search(r"_dh_action=restart.*_dh_action=start", postinst, re.S)
    assert "chgrp tb-agent" in postinst and "ReloadConfig" in postinst
    assert "deb-systemd-invoke stop 'tb-agent.service'" in (control / "prerm").read_text()
    postrm = (control / "postrm").read_text()
    assert "deb-systemd-helper purge 'tb-agent.service'" in postrm
    assert 'rm -rf "${DPKG_ROOT}/var/lib/tb-agent"' in postrm


def test_deb_preinst_creates_the_user_before_unpacking(deb_tree, tmp_path):
    """The real preinst, run against an empty root (DPKG_ROOT), creates user and group."""
    _, control = deb_tree
    (tmp_path / "etc").mkdir()
    run("sh", control / "preinst", "install", env={**os.environ, "DPKG_ROOT": str(tmp_path)})
    assert re.search(r"^tb-agent:x:\d+:\d+:[^:]*:/var/lib/tb-agent:",
                     (tmp_path / "etc/passwd").read_text(), re.M)
    assert re.search(r"^tb-agent:x:\d+:", (tmp_path / "etc/group").read_text(), re.M)


def test_lintian_is_clean(packages):
    # Overrides ship in the package (/usr/share/lintian/overrides/tb-agent), each with a reason.
    r = run("lintian", "--fail-on", "error,warning", "--pedantic", packages["deb"], ok=False)
    report = [ln for ln in r.stdout.splitlines() if re.match(r"[EWP]: ", ln)]
    assert r.returncode == 0 and not report, r.stdout + r.stderr


# --- the .rpm ------------------------------------------------------------------------------------

def rpm_files(rpm):
    out = run("rpm", "-qp", "--qf",
              "[%{FILEMODES:perms} %{FILEUSERNAME} %{FILEGROUPNAME} %{FILEFLAGS:fflags} "
              "%{FILENAMES}\n]", rpm).stdout
    files = {}
    for line in out.splitlines():
        perms, user, group, flags, name = line.split(" ", 4)
        files[name] = (perms, user, group, flags)
    return files


def test_rpm_files_modes_and_config(packages):
    files = rpm_files(packages["rpm"])
    for path, mode in FILES.items():
        assert path in files, f"{path} not in the .rpm"
        perms, user, group, flags = files[path]
        assert perms == "-" + stat.filemode(mode)[1:], (path, perms)
        if path == "/etc/tb-agent.yaml":
            assert (user, group) == ("root", "tb-agent")
            assert "c" in flags and "n" in flags, f"not %config(noreplace): {flags}"
        else:
            assert (user, group) == ("root", "root"), path
            assert "c" not in flags, f"{path} marked %config"
    # Directories other packages own are not ours (rpmlint: standard-dir-owned-by-package).
    dirs = {p for p, (perms, *_) in files.items() if perms.startswith("d")}
    assert dirs <= {"/usr/share/doc/tb-agent"}, dirs
    assert run("rpm", "-qpc", packages["rpm"]).stdout.split() == ["/etc/tb-agent.yaml"]


def test_rpm_requires_are_computed_from_the_binary(packages):
    requires = run("rpm", "-qpR", packages["rpm"]).stdout
    for soname in (r"libcoap-3-\w+\.so\.3", r"libsystemd\.so\.0", r"libsqlite3\.so\.0",
                   r"libc\.so\.6"):
        assert re.search(rf"^{soname}\(", requires, re.M), soname
    if STATIC_CXX:
        assert not re.search(r"libstdc\+\+|libyaml-cpp", requires), requires


def test_rpm_scripts(packages):
    scripts = run("rpm", "-qp", "--scripts", packages["rpm"]).stdout
    parts = dict(re.findall(r"^(\w+) scriptlet \(using /bin/sh\):\n(.*?)(?=^\w+ scriptlet|\Z)",
                            scripts, re.S | re.M))
    assert set(parts) == {"preinstall", "postinstall", "preuninstall", "postuninstall"}, parts
    sysusers = (SRC / "systemd/tb-agent.sysusers").read_text().strip()
    assert "systemd-sysusers --replace=/usr/lib/sysusers.d/tb-agent.conf -" in parts["preinstall"]
    assert sysusers in parts["preinstall"]
    assert "systemctl --no-reload preset tb-agent.service" in parts["postinstall"]
    assert "systemctl --no-reload disable --now tb-agent.service" in parts["preuninstall"]
    assert "systemctl try-restart tb-agent.service" in parts["postuninstall"]
    for name, body in parts.items():
        r = subprocess.run(["sh", "-n"], input=body, capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)


def test_rpmlint_is_clean(packages):
    # Accepted messages are filtered in packaging/rpm/rpmlint.toml, each with its reason.
    r = run("rpmlint", "-c", SRC / "packaging/rpm/rpmlint.toml", packages["rpm"], ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\b0 errors, 0 warnings\b", r.stdout), r.stdout


def test_rpm_installs_into_an_empty_root(packages, tmp_path):
    """rpm --root into an empty root. --nodeps: the root's rpm database is empty (the host's
    libraries are dpkg's), so nothing would satisfy libc.so.6 and the rest. --noscripts: the
    scriptlets run chrooted there, and the empty root has no /bin/sh; %pre's effect (the user)
    is made the way %pre makes it, with systemd-sysusers on the shipped file."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    run("systemd-sysusers", f"--root={root}", SRC / "systemd/tb-agent.sysusers")
    gid = int(re.search(r"^tb-agent:x:(\d+):", (root / "etc/group").read_text(), re.M).group(1))
    run("rpm", "--root", root, "--initdb")
    run("rpm", "--root", root, "-i", "--nodeps", "--noscripts", packages["rpm"])
    assert run("rpm", "--root", root, "-q", "tb-agent").stdout.startswith("tb-agent-")
    for path, mode in FILES.items():
        st = (root / path.lstrip("/")).stat()
        assert stat.S_IMODE(st.st_mode) == mode, path
    conf = (root / "etc/tb-agent.yaml").stat()
    assert (conf.st_uid, conf.st_gid) == (0, gid)
    assert (root / "etc/tb-agent.yaml").read_bytes() == (SRC / "config/tb-agent.yaml").read_bytes()
    # Every installed file matches the package (size, digest, mode, owner).
    run("rpm", "--root", root, "-V", "--nodeps", "tb-agent")
    out = run(root / "usr/bin/tb-agent", "--version").stdout.strip()
    assert out == f"tb-agent {project_version()}"
