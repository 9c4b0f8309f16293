# ctest-labels: integration dbus
"""The real tb-agent on a private system-type dbus-daemon that loads the real policy: its
properties follow the agent's state through provisioning, delivery, outage, recovery and a
revoked token, PropertiesChanged signals arrive, and Flush()/Reload() work for root."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent import server_config, source_dir, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET
from test_dbus_policy import BUS_CONFIG, NAME, PATH, IFACE, tool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the policy lets root own")


@pytest.fixture
def bus():
    d = Path(tempfile.mkdtemp(prefix="tb-dbus-agent-"))
    sock = d / "bus.sock"
    conf = d / "bus.conf"
    conf.write_text(BUS_CONFIG.format(socket=sock,
                                      policy=source_dir() / "systemd" / "io.tbagent.Agent1.conf"))
    daemon = subprocess.Popen([tool("dbus-daemon"), "--config-file", str(conf), "--nofork",
                               "--print-address"], stdout=subprocess.PIPE, text=True)
    address = daemon.stdout.readline().strip()
    assert address, "dbus-daemon did not start"
    yield address
    daemon.terminate()
    daemon.wait()
    shutil.rmtree(d, ignore_errors=True)


def busctl(address, *args, check=True):
    r = subprocess.run([tool("busctl"), f"--address={address}", *args], capture_output=True,
                       text=True, timeout=10)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def prop(address, name):
    r = busctl(address, "--json=short", "get-property", NAME, PATH, IFACE, name, check=False)
    if r.returncode != 0:
        return None
    return json.loads(r.stdout)["data"]


def wait_prop(address, name, predicate, what, timeout=15):
    def check():
        v = prop(address, name)
        return v is not None and predicate(v)
    wait_until(check, timeout, what=f"{name} {what} (last {prop(address, name)!r})")


def test_properties_follow_the_agent_and_signals_arrive(server, agents, tmp_path, bus):
    temp = tmp_path / "t"
    temp.write_text("3\n")
    agent = agents({
        "server": server_config(server),
        "device": {"name": "dbus-1"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "room", "type": "file", "path": str(temp), "key": "v",
                     "interval": "200ms"}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "300ms", "backoff_max": "1s"},
        "dbus": {"bus": "system"},
    })
    monitor_out = open(tmp_path / "monitor.json", "w")
    # Everything on the bus (the name does not exist yet); filtered below.
    monitor = subprocess.Popen([tool("busctl"), f"--address={bus}", "monitor", "--json=short"],
                               stdout=monitor_out, stderr=subprocess.DEVNULL)
    try:
        server.command("delay 2500")  # provisioning takes a while: long enough to be seen
        agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
        wait_prop(bus, "State", lambda v: v == "provisioning", "== provisioning")
        assert prop(bus, "Provisioned") is False
        assert prop(bus, "Server") == f"127.0.0.1:{server.port}"
        assert prop(bus, "DeviceName") == "dbus-1"
        server.command("delay 0")

        wait_prop(bus, "State", lambda v: v == "running", "== running")
        assert prop(bus, "Provisioned") is True
        wait_prop(bus, "SentReadings", lambda v: v > 0, "> 0")
        assert prop(bus, "LastSuccessTime") > (time.time() - 60) * 1e6
        assert "room" in busctl(bus, "get-property", NAME, PATH, IFACE, "Sources").stdout

        server.command("fail-all 5.00")
        wait_prop(bus, "State", lambda v: v == "retrying", "== retrying")
        wait_prop(bus, "LastError", lambda v: "5.00" in v, "mentions 5.00")
        wait_prop(bus, "QueuedReadings", lambda v: v > 0, "> 0")

        server.command("fail-all off")
        busctl(bus, "call", NAME, PATH, IFACE, "Flush")  # root may; skips the backoff wait
        wait_prop(bus, "State", lambda v: v == "running", "== running after the outage")
        wait_prop(bus, "LastError", lambda v: v == "", "cleared")
        sent = prop(bus, "SentReadings")

        # Reload(): a broken file is refused with its problems, the agent keeps running.
        good = agent.config_path.read_text()
        agent.config_path.write_text("server: {host: 127.0.0.1, port: nope}\n")
        r = busctl(bus, "call", NAME, PATH, IFACE, "Reload", check=False)
        # busctl prints the message, not the error name (test_dbus checks the name).
        assert r.returncode != 0, r
        assert f"{agent.config_path}:1:" in r.stderr + r.stdout, r
        assert prop(bus, "State") == "running"
        agent.config_path.write_text(good)
        busctl(bus, "call", NAME, PATH, IFACE, "Reload")
        wait_prop(bus, "SentReadings", lambda v: v > sent, "grows after reload")

        creds = agent.credentials()
        server.command(f"revoke {creds['credentialsValue']}")
        wait_prop(bus, "State", lambda v: v == "unauthorized", "== unauthorized")
        wait_prop(bus, "LastError", lambda v: "4.01" in v, "mentions 4.01")
        assert agent.stop() == 0
    finally:
        monitor.send_signal(signal.SIGINT)  # lets busctl flush what it printed
        monitor.wait(timeout=10)
        monitor_out.close()

    states = []
    for line in (tmp_path / "monitor.json").read_text().splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("member") != "PropertiesChanged" or msg.get("path") != PATH:
            continue
        changed = msg.get("payload", {}).get("data", [None, {}])[1]
        if "State" in changed:
            states.append(changed["State"]["data"])
    # "provisioning" was seen above with get-property; its signal can precede the monitor's
    # registration on a loaded machine. The later transitions come seconds after start.
    assert [s for s in states if s in ("retrying", "unauthorized")] == ["retrying", "unauthorized"]
    assert "running" in states[: states.index("retrying")], states
    assert "running" in states[states.index("retrying"):states.index("unauthorized")], states


def test_status_comes_back_after_the_bus_restarts(server, agents, tmp_path):
    """dbus-daemon restarted under a running agent: delivery never stops, and the agent serves
    its status on the new bus by itself (as after `systemctl restart dbus`)."""
    sock = tmp_path / "bus.sock"
    conf = tmp_path / "bus.conf"
    conf.write_text(BUS_CONFIG.format(socket=sock,
                                      policy=source_dir() / "systemd" / "io.tbagent.Agent1.conf"))
    # The address without the broker's guid, like the system bus's: a restarted broker has a new
    # guid, and sd-bus refuses one that differs from the address's.
    address = f"unix:path={sock}"

    def start_bus():
        d = subprocess.Popen([tool("dbus-daemon"), "--config-file", str(conf), "--nofork",
                              "--print-address"], stdout=subprocess.PIPE, text=True)
        assert d.stdout.readline().strip(), "dbus-daemon did not start"
        return d

    temp = tmp_path / "t"
    temp.write_text("3\n")
    agent = agents({
        "server": server_config(server),
        "device": {"name": "dbus-restart"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "room", "type": "file", "path": str(temp), "key": "v",
                     "interval": "100ms"}],
        "delivery": {"flush_interval": "100ms"},
        "dbus": {"bus": "system"},
    })
    daemon = start_bus()
    try:
        agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": address})
        wait_prop(address, "State", lambda v: v == "running", "== running")

        daemon.terminate()
        daemon.wait()
        agent.wait_log("connection to the system bus lost")
        before = len(server.points("dbus-restart"))
        wait_until(lambda: len(server.points("dbus-restart")) > before + 5,
                   what="telemetry while the bus is down")

        daemon = start_bus()
        # The first attempt comes within 1 s, the next within 2 s more (full jitter).
        wait_prop(address, "State", lambda v: v == "running", "== running on the new bus")
        wait_prop(address, "SentReadings", lambda v: v > before, f"> {before}")
        assert busctl(address, "status", NAME, check=False).returncode == 0  # owns the name again
        assert agent.running()
        assert agent.stop() == 0
    finally:
        daemon.terminate()
        daemon.wait()
