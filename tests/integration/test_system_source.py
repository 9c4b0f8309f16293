# ctest-labels: integration
"""type: system end to end: the real agent reads this machine's /proc and file systems and
ThingsBoard gets the host's health with the documented keys and types (docs/sources.md)."""
import json
import os
import time

from agent import Agent, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET

PERCENT_KEYS = ("cpu_usage", "memory_used_percent", "disk_used_percent")
BYTE_KEYS = ("memory_total", "memory_available", "disk_total", "disk_available")


def check_values(values):
    for k in PERCENT_KEYS:
        assert isinstance(values[k], (int, float)) and 0 <= values[k] <= 100, (k, values[k])
    for k in BYTE_KEYS:
        assert isinstance(values[k], int) and values[k] >= 0, (k, values[k])
    assert values["memory_available"] <= values["memory_total"]
    assert values["disk_available"] <= values["disk_total"]
    assert isinstance(values["uptime"], int) and values["uptime"] > 0
    for k in ("load_1", "load_5", "load_15"):
        assert values[k] >= 0, (k, values[k])
    # The disk is the one disk_path is on: the same total as Python's statvfs sees.
    st = os.statvfs("/")
    assert values["disk_total"] == st.f_blocks * st.f_frsize


def test_test_mode_prints_the_hosts_health(tmp_path):
    a = Agent(tmp_path, {
        "server": {"host": "192.0.2.1"},  # never contacted
        "sources": [{"name": "host", "type": "system", "interval": "1m"}]})
    r = a.run_once("--test")
    assert r.returncode == 0, r.stderr
    batch = json.loads(r.stdout)
    assert len(batch) == 1
    check_values(batch[0]["values"])


def test_the_server_gets_the_hosts_health(server, agents):
    agent = agents({
        "server": server_config(server),
        "device": {"name": "gateway-1"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "host", "type": "system", "interval": "1s",
                     "metrics": ["cpu", "memory", "load", "uptime", "disk"]}],
        "delivery": {"flush_interval": "100ms"},
    })
    started_ms = int(time.time() * 1000)
    agent.start()
    # Two collections: the first (two samples 250 ms apart) and one a second later.
    wait_until(lambda: len({p.ts for p in server.points("gateway-1")}) >= 2, timeout=20,
               what=f"two system readings\n{agent.log()[-2000:]}")
    assert agent.stop() == 0
    by_ts = {}
    for p in server.points("gateway-1"):
        by_ts.setdefault(p.ts, {})[p.key] = p.value
    for ts, values in by_ts.items():
        assert ts >= started_ms
        assert set(values) == {"cpu_usage", "memory_total", "memory_available",
                               "memory_used_percent", "load_1", "load_5", "load_15", "uptime",
                               "disk_total", "disk_available", "disk_used_percent"}, values
        check_values(values)
