# ctest-labels: integration
"""What tb-agent maps into memory (issue 3's peak-RSS goal; cmake/Footprint.cmake says why).

The figures themselves are measured by bench/drain_bench.cpp, not here. These tests hold the
choices that make them: tb-agent links no libcoap (src/coap/libcoap.hpp loads the plain build
for coap and the OpenSSL build only for coaps), so a running agent that delivers telemetry over
plain coap has no OpenSSL mapped; and no C++ shared library (libstdc++, yaml-cpp, spdlog, fmt)
unless it was built without TB_STATIC_CXX or with the sanitizers; and no libsqlite3 when SQLite is
linked from its archive (TB_SQLITE_IS_STATIC).
"""
import re
import subprocess

import pytest

from agent import build_dir, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET


def cache(name):
    text = (build_dir() / "CMakeCache.txt").read_text()
    m = re.search(rf"^{name}:[A-Z]+=(.*)$", text, re.M)
    return m.group(1) if m else ""


def on(name):
    return cache(name).upper() in ("ON", "1", "TRUE", "YES")


def needed():
    out = subprocess.run(["readelf", "-d", str(build_dir() / "src" / "tb-agent")],
                         capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def mapped_libraries(pid):
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}


def forbidden():
    """Library name prefixes this build must not load."""
    names = ["libspdlog", "libfmt"]  # always header-only
    names += ["libssl", "libcrypto", "libcoap-3-openssl"]  # plain coap: no TLS library at all
    if on("TB_STATIC_CXX") and not on("TB_SANITIZE"):
        names += ["libstdc++", "libgcc_s", "libyaml-cpp"]
    if on("TB_SQLITE_IS_STATIC"):
        names += ["libsqlite3"]
    return names


def test_linked_libraries_are_the_small_set():
    libs = needed()
    assert any(lib.startswith("libsystemd") for lib in libs), libs  # the check can see libraries
    # libcoap is loaded at run time, the build the configuration needs (src/coap/libcoap.hpp).
    assert not any(lib.startswith("libcoap") for lib in libs), libs
    bad = [lib for lib in libs if any(lib.startswith(n) for n in forbidden())]
    assert not bad, f"tb-agent links {bad}; see cmake/Footprint.cmake"


def sections():
    """{name: (address, size)} of tb-agent's sections."""
    out = subprocess.run(["readelf", "-SW", str(build_dir() / "src" / "tb-agent")],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for m in re.finditer(r"\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", out):
        found[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16))
    return found


def test_the_loops_read_only_data_fits_two_fault_around_windows():
    # cmake/hot-rodata.ld (lld builds with the hot order, not under the sanitizers): what the
    # loop reads comes back in two 64 KiB windows, which holds only while the section starts on
    # a window and is at most two long. Growing past that costs a window per run, silently;
    # this says so (docs/performance.md, "On a booted systemd host").
    if not on("TB_LINKS_WITH_LLD") or on("TB_SANITIZE") or not on("TB_ORDER_HOT_CODE"):
        pytest.skip("not linked with lld and the hot order")
    found = sections()
    assert ".rodata" in found, found  # the parse works
    assert ".rodata.hot" in found, "cmake/hot-rodata.ld was not applied"
    at, size = found[".rodata.hot"]
    assert at % 0x10000 == 0, f".rodata.hot at {at:#x}: not on a 64 KiB boundary"
    assert 0 < size <= 2 * 0x10000, (
        f".rodata.hot is {size} bytes: more than two windows; trim bench/hot_functions.py's "
        "RODATA_ALWAYS or the SQLite objects, and regenerate")
    assert found[".rodata"][0] > at, ".rodata.hot is not before .rodata"


def test_a_delivering_agent_maps_none_of_the_big_libraries(server, agents, tmp_path):
    value = tmp_path / "value"
    value.write_text("21.5\n")
    agent = agents({
        "server": server_config(server),
        "device": {"name": "footprint"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "room", "type": "file", "path": str(value), "key": "t",
                     "interval": "100ms"}],
        "delivery": {"flush_interval": "0"},
    })
    agent.start()
    wait_until(lambda: server.points("footprint"), what="telemetry from the agent")
    libs = mapped_libraries(agent.proc.pid)
    assert any(lib.startswith("libcoap-3-notls") for lib in libs), libs  # loaded, the plain build
    bad = sorted(lib for lib in libs if any(lib.startswith(n) for n in forbidden()))
    assert not bad, f"a running tb-agent maps {bad}; see cmake/Footprint.cmake"
    assert agent.stop() == 0
