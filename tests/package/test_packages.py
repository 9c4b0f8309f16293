# ctest-labels: package
"""The .deb and .rpm built by CPack from the build directory (packaging/README.md): contents,
modes, conffiles, computed dependencies, maintainer scripts, the version, lintian and rpmlint,
and an rpm install into an empty root; the plugin SDK's tb-agent-dev / tb-agent-devel (contents,
dependency on the agent, lint, and the example plugin built against the unpacked .deb). The life cycle in a booted systemd (install, upgrade,
remove, purge) is the systest's.

Needs a build configured with -DCMAKE_INSTALL_PREFIX=/usr (scripts/test.sh does) and the tools
dpkg-deb, lintian, rpm, rpmbuild, rpmlint (scripts/install-deps.sh)."""
import gzip
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

BUILD = Path(os.environ["TB_BUILD_DIR"])
SRC = Path(os.environ["TB_SOURCE_DIR"])
STATIC_CXX = os.environ.get("TB_STATIC_CXX", "ON").upper() in ("ON", "1", "TRUE", "YES")
# SQLite from its archive (cmake/Footprint.cmake): no libsqlite3-0 / libsqlite3.so.0 dependency.
STATIC_SQLITE = os.environ.get("TB_SQLITE_IS_STATIC", "OFF").upper() in ("ON", "1", "TRUE", "YES")

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
    """The agent's packages (CPackConfig.cmake) and the plugin SDK's (CPackDevConfig.cmake), as
    scripts/build-packages.sh builds them."""
    out = tmp_path_factory.mktemp("packages")
    for config in ("CPackConfig.cmake", "CPackDevConfig.cmake"):
        for generator in ("DEB", "RPM"):
            run("cpack", "-G", generator, "-B", out, "--config", BUILD / config)
    debs = sorted(out.glob("*.deb"))
    rpms = sorted(out.glob("*.rpm"))
    assert len(debs) == 2 and len(rpms) == 2, sorted(p.name for p in out.iterdir())
    main_deb, dev_deb = (next(p for p in debs if p.name.startswith(prefix))
                         for prefix in ("tb-agent_", "tb-agent-dev_"))
    main_rpm, dev_rpm = (next(p for p in rpms if re.match(rf"{prefix}\d", p.name))
                         for prefix in ("tb-agent-", "tb-agent-devel-"))
    return {"deb": main_deb, "rpm": main_rpm, "dev_deb": dev_deb, "dev_rpm": dev_rpm, "dir": out}


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
    assert packages["dev_deb"].name == f"tb-agent-dev_{v}_{arch}.deb"
    assert packages["dev_rpm"].name == f"tb-agent-devel-{v}-1.{rpm_arch}.rpm"


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
    assert {"libc6", "libsystemd0"} <= names, depends
    assert ("libsqlite3-0" in names) != STATIC_SQLITE, depends
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


@pytest.mark.parametrize("which", ["deb", "dev_deb"])
def test_lintian_is_clean(packages, which):
    # Overrides ship in the package (/usr/share/lintian/overrides/tb-agent), each with a reason.
    r = run("lintian", "--fail-on", "error,warning", "--pedantic", packages[which], ok=False)
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
    assert dirs <= {"/usr/share/doc/tb-agent", "/usr/share/tb-agent",
                    "/usr/share/tb-agent/dashboards"}, dirs
    assert run("rpm", "-qpc", packages["rpm"]).stdout.split() == ["/etc/tb-agent.yaml"]


def test_rpm_requires_are_computed_from_the_binary(packages):
    requires = run("rpm", "-qpR", packages["rpm"]).stdout
    for soname in (r"libcoap-3-\w+\.so\.3", r"libsystemd\.so\.0", r"libc\.so\.6"):
        assert re.search(rf"^{soname}\(", requires, re.M), soname
    assert bool(re.search(r"^libsqlite3\.so\.0\(", requires, re.M)) != STATIC_SQLITE, requires
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


@pytest.mark.parametrize("which", ["rpm", "dev_rpm"])
def test_rpmlint_is_clean(packages, which):
    # Accepted messages are filtered in packaging/rpm/rpmlint.toml, each with its reason.
    r = run("rpmlint", "-c", SRC / "packaging/rpm/rpmlint.toml", packages[which], ok=False)
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


# --- the plugin SDK: tb-agent-dev / tb-agent-devel -----------------------------------------------

def multiarch_libdir():
    cache = (BUILD / "CMakeCache.txt").read_text()
    m = re.search(r"^CMAKE_INSTALL_LIBDIR:PATH=(\S+)$", cache, re.M)
    assert m, "no CMAKE_INSTALL_LIBDIR in CMakeCache.txt"
    return "/usr/" + m.group(1)


def sdk_files():
    return {"/usr/include/tb-agent/source_plugin.h",
            f"{multiarch_libdir()}/pkgconfig/tb-agent-plugin.pc"}


def test_dev_deb_contents_and_control(packages, tmp_path):
    deb = packages["dev_deb"]
    listing = run("dpkg-deb", "-c", deb).stdout
    files = {}
    for line in listing.splitlines():
        perms, owner, _size, _date, _time, name = line.split(None, 5)
        if not perms.startswith("d"):
            files[name.lstrip(".")] = (perms, owner)
    assert set(files) == sdk_files() | {"/usr/share/doc/tb-agent-dev/copyright",
                                        "/usr/share/doc/tb-agent-dev/changelog.gz"}, files
    assert all(v == ("-rw-r--r--", "root/root") for v in files.values()), files
    v = project_version()
    assert deb_field(deb, "Package") == "tb-agent-dev"
    assert deb_field(deb, "Section") == "libdevel"
    assert deb_field(deb, "Depends") == f"tb-agent (= {v})"
    assert deb_field(deb, "Pre-Depends") == ""
    run("dpkg-deb", "-e", deb, tmp_path / "control")
    # No maintainer scripts and no conffiles: the SDK is files only.
    assert sorted(p.name for p in (tmp_path / "control").iterdir()) == ["control", "md5sums"]


def test_devel_rpm_contents_and_requires(packages):
    rpm = packages["dev_rpm"]
    files = rpm_files(rpm)
    assert set(files) == sdk_files() | {"/usr/include/tb-agent"}, files
    for path, (perms, user, group, flags) in files.items():
        assert (user, group) == ("root", "root") and "c" not in flags, path
        assert perms == ("drwxr-xr-x" if path == "/usr/include/tb-agent" else "-rw-r--r--"), path
    requires = run("rpm", "-qpR", rpm).stdout.splitlines()
    assert f"tb-agent = {project_version()}-1" in requires, requires
    assert run("rpm", "-qp", "--qf", "%{NAME} %{GROUP}", rpm).stdout == \
        "tb-agent-devel Development/Libraries"
    assert run("rpm", "-qp", "--scripts", rpm).stdout == ""


def test_example_plugin_builds_against_the_dev_deb_and_the_packaged_agent_loads_it(
        packages, deb_tree, tmp_path):
    """examples/hwmon-plugin built in a clean directory against the header and .pc file unpacked
    from tb-agent-dev (pkg-config with a sysroot, as for a cross build), then loaded by the
    packaged agent's --test."""
    sysroot = tmp_path / "sysroot"
    run("dpkg-deb", "-x", packages["dev_deb"], sysroot)
    pc_dir = sysroot / f"{multiarch_libdir()}/pkgconfig".lstrip("/")
    work = tmp_path / "clean"
    work.mkdir()
    for f in ("hwmon.c", "Makefile"):
        (work / f).write_bytes((SRC / "examples/hwmon-plugin" / f).read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKG_CONFIG")}
    env.update(PKG_CONFIG_SYSROOT_DIR=str(sysroot), PKG_CONFIG_LIBDIR=str(pc_dir),
               PKG_CONFIG_PATH=str(pc_dir))
    r = run("make", "CFLAGS=-O2 -Wall -Wextra -Werror", cwd=work, env=env)
    # The only include path is the unpacked package's, never the source tree's.
    includes = re.findall(r"-I(\S+)", r.stdout)
    assert includes and all(Path(i).resolve() == sysroot / "usr/include" for i in includes), \
        r.stdout
    so = work / "hwmon.so"
    exported = run("nm", "-D", "--defined-only", so).stdout.split()
    assert "tb_source_plugin_v1" in exported

    root, _ = deb_tree
    config = tmp_path / "tb-agent.yaml"
    config.write_text(json.dumps({
        "server": {"host": "192.0.2.1"},  # never contacted
        "sources": [{"name": "sim", "type": "plugin", "path": str(so),
                     "options": {"simulate": True}}]}))
    r = run(root / "usr/bin/tb-agent", "--test", "--config", config,
            "--state-dir", tmp_path / "state", "--log-target", "stderr")
    [record] = json.loads(r.stdout)
    assert record["values"]["simulated"] is True, record
    assert 30 <= record["values"]["temp1"] <= 50, record
