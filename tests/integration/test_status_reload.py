# ctest-labels: integration dbus
"""Issue 9, the agent side, with the real binaries: `tb-agent status` (human and --json; exit 3
without an agent) and `tb-agent reload` (waits for the agent's answer; a refused config fails
with its positions and the agent keeps the old one; --pid without a bus) against the real agent
on a private system-type bus with the real policy; a config without provisioning or token
starts idle in state `unconfigured` (D-Bus, STATUS=, no wake-ups) until a reload configures it;
one log line per source event and no libcoap echo of a failed delivery."""
import json
import os
import re
import signal
import subprocess
import time

import pytest

from agent import build_dir, server_config, source_dir, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET
from test_dbus_agent import bus, prop, wait_prop  # noqa: F401  (bus is a fixture)
from tbserver import TbServer
from test_service import NotifyListener

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: the bus policy lets root own and call")
TB_AGENT = build_dir() / "src" / "tb-agent"


@pytest.fixture
def notify(tmp_path):
    n = NotifyListener(tmp_path)
    yield n
    n.close()


def cli(*args, address=None, timeout=60):
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    if address:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = address
    return subprocess.run([str(TB_AGENT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def running_config(server, tmp_path, name, bus="system"):
    temp = tmp_path / "t"
    temp.write_text("3\n")
    return {
        "server": server_config(server),
        "device": {"name": name},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "room", "type": "file", "path": str(temp), "key": "v",
                     "interval": "200ms"}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "300ms", "backoff_max": "1s"},
        "dbus": {"bus": bus},
    }


def context_switches(pid):
    """Voluntary + involuntary context switches: every wake-up of the process counts."""
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)


@needs_root
def test_status_prints_a_summary_and_json(server, agents, tmp_path, bus):
    agent = agents(running_config(server, tmp_path, "status-1"))
    agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
    wait_prop(bus, "SentReadings", lambda v: v > 0, "> 0")
    time.sleep(0.5)  # a source reading after the first delivery

    r = cli("status", "--config", str(agent.config_path), address=bus)
    assert r.returncode == 0, r
    out = r.stdout
    assert re.search(r"^ +State: running \(", out, re.M), out
    assert re.search(r"^ +Device: status-1 \(provisioned\)$", out, re.M), out
    assert re.search(rf"^ +Server: 127\.0\.0\.1:{server.port}$", out, re.M), out
    assert re.search(r"^ +Readings: \d+ queued, [1-9]\d* sent, 0 dropped$", out, re.M), out
    assert re.search(r"^Last success: \d+ s ago$", out, re.M), out
    assert re.search(r"^ +Last error: none$", out, re.M), out
    assert re.search(r"^ +Sources: room \(file, every 200ms\): [1-9]\d* readings, 0 errors, "
                     r"last read \d+ s ago$", out, re.M), out

    # The options also come after the subcommand; --json is one object with the same facts.
    r = cli("--config", str(agent.config_path), "status", "--json", address=bus)
    assert r.returncode == 0, r
    j = json.loads(r.stdout)
    assert j["state"] == "running"
    assert j["status_text"].startswith(("running", "delivering"))
    assert j["device_name"] == "status-1" and j["provisioned"] is True
    assert j["server"] == f"127.0.0.1:{server.port}"
    assert j["sent_readings"] > 0
    assert 0 <= j["last_success_age_s"] < 60
    assert j["last_success_time_us"] > (time.time() - 60) * 1e6
    [room] = j["sources"]
    assert room["name"] == "room" and room["type"] == "file" and room["interval_us"] == 200_000
    assert room["readings"] > 0 and room["errors"] == 0 and room["last_reading_age_s"] < 60

    # An outage: the state says why, and the error is shown.
    server.command("fail-all 5.00")
    wait_prop(bus, "State", lambda v: v == "retrying", "== retrying")
    r = cli("status", "--config", str(agent.config_path), address=bus)
    assert r.returncode == 0, r
    assert re.search(r"State: retrying \(retrying in .*5\.00", r.stdout), r.stdout
    assert re.search(r"Last error: .*5\.00", r.stdout), r.stdout
    server.command("fail-all off")
    assert agent.stop() == 0


@needs_root
def test_status_without_an_agent_exits_3(tmp_path, bus):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server: {host: 127.0.0.1}\n")
    r = cli("status", "--config", str(cfg), address=bus)
    assert r.returncode == 3, r
    assert "not running" in r.stderr and r.stdout == "", r
    r = cli("status", "--json", "--config", str(cfg), address=f"unix:path={tmp_path}/no-bus")
    assert r.returncode == 3, r
    assert "system bus" in r.stderr, r
    # dbus.bus: none — nothing to ask.
    cfg.write_text("server: {host: 127.0.0.1}\ndbus: {bus: none}\n")
    r = cli("status", "--config", str(cfg), address=bus)
    assert r.returncode == 3 and "dbus.bus: none" in r.stderr, r


@needs_root
def test_reload_waits_for_the_answer_and_fails_on_a_refused_config(server, agents, tmp_path, bus):
    cfg = running_config(server, tmp_path, "reload-1")
    agent = agents(cfg)
    agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
    wait_prop(bus, "State", lambda v: v == "running", "== running")

    other = tmp_path / "other"
    other.write_text("7\n")
    cfg["sources"].append({"name": "second", "type": "file", "path": str(other), "key": "w",
                           "interval": "200ms"})
    agent.write_config(cfg)
    r = cli("reload", "--config", str(agent.config_path), address=bus)
    assert r.returncode == 0, r
    # It returned after the agent applied the file, not merely after sending a signal.
    assert "source 'second' added" in agent.log()
    wait_until(lambda: any(p[0] == "w" for p in server.points("reload-1")), what="new source")

    good = agent.config_path.read_text()
    agent.config_path.write_text(good.replace('"interval": "200ms"', '"interval": "5 parsecs"', 1))
    r = cli("reload", "--config", str(agent.config_path), address=bus)
    assert r.returncode == 78, r
    assert "refused" in r.stderr and f"{agent.config_path}:" in r.stderr, r
    assert re.search(rf"{re.escape(str(agent.config_path))}:\d+:\d+: ", r.stderr), r
    # The agent keeps running on the previous configuration.
    assert agent.running()
    sent = prop(bus, "SentReadings")
    wait_prop(bus, "SentReadings", lambda v: v > sent + 2, "grows on the old config")
    assert prop(bus, "State") == "running"
    agent.config_path.write_text(good)
    assert agent.stop() == 0


def test_reload_without_a_bus_checks_then_signals_the_pid(server, agents, tmp_path):
    cfg = running_config(server, tmp_path, "reload-2", bus="none")
    agent = agents(cfg)
    agent.start()
    agent.wait_log("state provisioning -> running")

    agent.config_path.write_text("server: {host: 127.0.0.1, port: nope}\n")
    r = cli("reload", "--config", str(agent.config_path), "--pid", str(agent.proc.pid))
    assert r.returncode == 78, r
    assert f"{agent.config_path}:1:" in r.stdout, r
    time.sleep(0.5)
    assert "SIGHUP" not in agent.log()  # a broken file is never handed to the agent

    agent.write_config(cfg)
    r = cli("reload", "--config", str(agent.config_path), "--pid", str(agent.proc.pid))
    assert r.returncode == 0, r
    assert "sent SIGHUP" in r.stdout, r
    agent.wait_log("configuration reloaded")

    r = cli("reload", "--config", str(agent.config_path))  # no bus, no pid: nobody to ask
    assert r.returncode == 3, r
    assert agent.stop() == 0


def unconfigured_config(server, tmp_path):
    temp = tmp_path / "t"
    temp.write_text("3\n")
    return {
        "server": server_config(server),
        "device": {"name": "fresh-1"},
        "sources": [{"name": "room", "type": "file", "path": str(temp), "key": "v",
                     "interval": "100ms"}],
        "delivery": {"flush_interval": "100ms"},
        "dbus": {"bus": "system"},
    }


def test_check_config_of_an_unconfigured_file_is_ok_with_a_note(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{host: 127.0.0.1}}\nstate_dir: {tmp_path}/state\n")
    r = cli("--check-config", "--config", str(cfg))
    assert r.returncode == 0, r
    assert r.stdout == "OK\n"
    assert "idles unconfigured" in r.stderr and r.stderr.count("\n") == 1, r
    assert not (tmp_path / "state").exists()  # touches no state
    # With a token there is nothing to note.
    cfg.write_text("server: {host: 127.0.0.1}\ncredentials: {access_token: t}\n")
    r = cli("--check-config", "--config", str(cfg))
    assert (r.returncode, r.stdout, r.stderr) == (0, "OK\n", "")


@needs_root
def test_unconfigured_agent_idles_until_a_reload_configures_it(server, agents, tmp_path, bus,
                                                                 notify):
    cfg = unconfigured_config(server, tmp_path)
    agent = agents(cfg)
    agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus, "NOTIFY_SOCKET": notify.path})
    wait_until(lambda: notify.having("READY"), what="READY=1")
    wait_prop(bus, "State", lambda v: v == "unconfigured", "== unconfigured")
    assert agent.running()
    status = notify.statuses()[-1]
    assert status.startswith("not configured: set provisioning (or credentials.access_token) in "
                             f"{agent.config_path}"), notify.statuses()
    assert "systemctl reload tb-agent" in status
    assert prop(bus, "StatusText") == status
    assert prop(bus, "Provisioned") is False

    # Idle: no source runs, nothing is sent, and the process does not wake up at all.
    time.sleep(0.5)
    before = context_switches(agent.proc.pid)
    time.sleep(3)
    assert context_switches(agent.proc.pid) == before, "the unconfigured agent woke up"
    assert server.devices() == {}  # no provisioning happened
    assert not (agent.state_dir / "credentials.json").exists()
    assert "queued" not in agent.log()

    r = cli("status", "--config", str(agent.config_path), address=bus)
    assert r.returncode == 0 and "State: unconfigured (not configured:" in r.stdout, r

    # A reload that adds provisioning starts everything, without a restart.
    cfg["provisioning"] = {"key": PROVISION_KEY, "secret": PROVISION_SECRET}
    agent.write_config(cfg)
    r = cli("reload", "--config", str(agent.config_path), address=bus)
    assert r.returncode == 0, r
    wait_prop(bus, "State", lambda v: v == "running", "== running after the reload")
    wait_prop(bus, "SentReadings", lambda v: v > 0, "> 0")
    assert agent.credentials()["deviceName"] == "fresh-1"
    wait_until(lambda: len(server.points("fresh-1")) > 0, what="telemetry of the fresh device")
    assert agent.stop() == 0


@needs_root
def test_unconfigured_agent_configured_by_a_token(agents, tmp_path, bus):
    # A device created on the server by hand, with its token.
    server = TbServer(build_dir(), tmp_path / "srv", devices={"fresh-2": "token-dev"})
    server.start()
    try:
        configured_by_a_token(server, agents, tmp_path, bus)
    finally:
        server.stop()


def configured_by_a_token(server, agents, tmp_path, bus):
    cfg = unconfigured_config(server, tmp_path)
    agent = agents(cfg)
    agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
    wait_prop(bus, "State", lambda v: v == "unconfigured", "== unconfigured")
    cfg["credentials"] = {"access_token": "token-dev"}
    agent.write_config(cfg)
    agent.send_signal(signal.SIGHUP)  # SIGHUP configures it as well as `tb-agent reload`
    wait_prop(bus, "SentReadings", lambda v: v > 0, "> 0")
    assert prop(bus, "State") == "running"
    assert agent.stop() == 0


@needs_root
def test_shipped_config_starts_unconfigured(tmp_path, bus, notify):
    """config/tb-agent.yaml as installed: --check-config says OK (and why it will idle) and the
    agent starts, reports `unconfigured` and stays up instead of failing the unit."""
    shipped = (source_dir() / "config" / "tb-agent.yaml").read_text()
    assert re.search(r"^provisioning:", shipped, re.M) is None, "provisioning must be commented"
    assert re.search(r"^credentials:", shipped, re.M) is None
    # Name resolution of the placeholder host is not what this test is about (and must not leave
    # the machine): the same file with a loopback server.
    cfg = tmp_path / "tb-agent.yaml"
    cfg.write_text(shipped.replace("host: thingsboard.example.com", "host: 127.0.0.1"))
    state = tmp_path / "state"
    r = cli("--check-config", "--config", str(cfg), "--state-dir", str(state))
    assert (r.returncode, r.stdout) == (0, "OK\n"), r
    assert "unconfigured" in r.stderr
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=bus, NOTIFY_SOCKET=notify.path)
    log = open(tmp_path / "agent.log", "wb")
    proc = subprocess.Popen([str(TB_AGENT), "--config", str(cfg), "--state-dir", str(state),
                             "--log-target=stderr"], stdout=log, stderr=log, env=env)
    try:
        wait_until(lambda: notify.having("READY"), what="READY=1")
        wait_prop(bus, "State", lambda v: v == "unconfigured", "== unconfigured")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_a_changed_source_logs_one_line_and_failures_no_libcoap_echo(agents, tmp_path):
    """Reload: a changed source logs that it changed (not "(re)started" and then "removed"), an
    added and a removed one a line each. A failed delivery is reported once by the agent, without
    libcoap's own "ICMP: Connection refused" warning beside it."""
    temp = tmp_path / "t"
    temp.write_text("3\n")
    closed_port = 9  # discard: nothing listens on loopback, so every send gets an ICMP error
    cfg = {
        "server": {"host": "127.0.0.1", "port": closed_port, "request_timeout": "2s"},
        "credentials": {"access_token": "t"},
        "sources": [
            {"name": "host", "type": "file", "path": str(temp), "key": "v", "interval": "200ms"},
            {"name": "gone", "type": "file", "path": str(temp), "key": "g", "interval": "1s"}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "200ms", "backoff_max": "1s"},
    }
    agent = agents(cfg)
    agent.start(log_level="info")
    wait_until(lambda: agent.log().count("delivery failed") >= 2, what="failed deliveries")
    cfg["sources"][0]["interval"] = "300ms"
    del cfg["sources"][1]
    cfg["sources"].append({"name": "new", "type": "file", "path": str(temp), "key": "n",
                           "interval": "1s"})
    agent.write_config(cfg)
    agent.send_signal(signal.SIGHUP)
    agent.wait_log("configuration reloaded")
    assert agent.stop() == 0
    log = agent.log()
    host_lines = [l for l in log.splitlines() if "source 'host'" in l]
    assert len(host_lines) == 1 and "changed" in host_lines[0], host_lines
    assert [l for l in log.splitlines() if "source 'gone'" in l][0].endswith("removed")
    assert len([l for l in log.splitlines() if "source 'gone'" in l]) == 1
    assert len([l for l in log.splitlines() if "source 'new' added" in l]) == 1
    assert "libcoap" not in log, [l for l in log.splitlines() if "libcoap" in l][:3]
    assert "delivery failed (network error" in log
