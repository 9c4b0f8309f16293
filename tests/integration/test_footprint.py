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
