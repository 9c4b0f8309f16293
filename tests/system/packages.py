"""The .deb packages the system test installs: the freshly built one and an upgrade of it.

The package is built from the tree under test with CPack (packaging/, see packaging/README.md):
in TB_BUILD_DIR itself when that build installs to /usr, else in a side build
TB_BUILD_DIR/systest-pkg configured with -DCMAKE_INSTALL_PREFIX=/usr (the unit's ExecStart= and
the config path are fixed at configure time). TB_DEB=/path/to.deb uses a given package instead.

The upgrade package is the same package with a higher version (dpkg-deb repack: the same files
and maintainer scripts, Version + "+systest1"), which is what dpkg sees on a real upgrade; only
`tb-agent --version` still prints the old version.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path


class PackageError(RuntimeError):
    pass


def _cache_value(build_dir, name):
    try:
        text = (Path(build_dir) / "CMakeCache.txt").read_text()
    except OSError:
        return None
    m = re.search(rf"^{re.escape(name)}:[A-Z]+=(.*)$", text, re.M)
    return m.group(1) if m else None


def _run(argv, log, **kw):
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(map(str, argv)) + "\n").encode())
        out.flush()
        r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        raise PackageError(f"{' '.join(map(str, argv))} failed ({r.returncode}); see {log}")


def build_deb(build_dir, source_dir, out_dir, log):
    """Return the path of the freshly built tb-agent .deb."""
    if os.environ.get("TB_DEB"):
        return Path(os.environ["TB_DEB"])
    build_dir, out_dir = Path(build_dir), Path(out_dir)
    if not (Path(source_dir) / "packaging").is_dir():
        raise PackageError("this tree has no packaging/ (CPack) yet: nothing to install")
    pkg_build = build_dir
    if _cache_value(build_dir, "CMAKE_INSTALL_PREFIX") != "/usr":
        pkg_build = build_dir / "systest-pkg"
        argv = ["cmake", "-S", str(source_dir), "-B", str(pkg_build),
                "-DCMAKE_INSTALL_PREFIX=/usr", "-DTB_BUILD_TESTS=OFF", "-DTB_BUILD_BENCH=OFF",
                "-DCMAKE_BUILD_TYPE=" + (_cache_value(build_dir, "CMAKE_BUILD_TYPE") or
                                         "RelWithDebInfo")]
        for var in ("CMAKE_CXX_COMPILER_LAUNCHER", "CMAKE_C_COMPILER_LAUNCHER",
                    "TB_COAP_BACKEND"):
            v = _cache_value(build_dir, var)
            if v:
                argv.append(f"-D{var}={v}")
        _run(argv, log, timeout=600)
    _run(["cmake", "--build", str(pkg_build), "-j2", "--target", "tb-agent"], log, timeout=1800)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    _run(["cpack", "-G", "DEB", "-B", str(out_dir), "--config",
          str(pkg_build / "CPackConfig.cmake")], log, cwd=pkg_build, timeout=900)
    debs = sorted(out_dir.glob("tb-agent_*.deb"))
    if len(debs) != 1:
        raise PackageError(f"expected one tb-agent_*.deb in {out_dir}, found {debs}; see {log}")
    return debs[0]


def deb_field(deb, field):
    return subprocess.run(["dpkg-deb", "--field", str(deb), field], check=True,
                          capture_output=True, text=True).stdout.strip()


def upgrade_deb(deb, out_dir, log, suffix="+systest1"):
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
