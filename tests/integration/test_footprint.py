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
import signal
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


def resident_kib_of_the_binary(pid):
    """KiB of tb-agent's own file resident in this process (its mappings in /proc/PID/smaps)."""
    total, ours = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                ours = len(head) >= 6 and head[5].endswith("/tb-agent")
            elif ours and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_a_reload_gives_its_code_back_like_start_up(server, agents, tmp_path):
    # util/memory.hpp: 10 s after start, and again 10 s after each reload, the agent unmaps its
    # code and read-only data; what the loop runs faults back in. A reload runs the YAML parser
    # and builds sources: that code must not stay resident for the rest of the process's life.
    if on("TB_SANITIZE"):
        # The instrumented loop's own resident set moves by megabytes from one release to the
        # next (51 to 58 MB of 110): the test would measure that, not the reload's code.
        pytest.skip("measured in the build without sanitizers")
    value = tmp_path / "value"
    value.write_text("21.5\n")
    agent = agents({
        "server": server_config(server),
        "device": {"name": "released"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "room", "type": "file", "path": str(value), "key": "t",
                     "interval": "200ms"}],
    })
    agent.start(log_level="info")
    wait_until(lambda: server.points("released"), what="telemetry from the agent")
    pid = agent.proc.pid
    started = resident_kib_of_the_binary(pid)
    assert started > 0, "no mapping of the tb-agent file found"
    wait_until(lambda: resident_kib_of_the_binary(pid) < started * 3 // 4, timeout=20,
               what=f"start-up's code given back ({started} KiB resident at start)")
    released = resident_kib_of_the_binary(pid)
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_log("configuration reloaded")
    reloaded = resident_kib_of_the_binary(pid)
    assert reloaded > released + 64, (released, reloaded)  # the reload's code came in
    wait_until(lambda: resident_kib_of_the_binary(pid) <= released + (reloaded - released) // 4,
               timeout=20,
               what=f"the reload's code given back ({released} KiB before it, {reloaded} after)")
    assert agent.stop() == 0
