# ctest-labels: integration
"""Issue 8 (a hostile review), items 6-12, held against the real agent: text that is not UTF-8,
reloads of every source key, a provisioning record of the wrong shape, a secret_file FIFO, an
absurd drain_rate, file modes under a lax umask, and a closed stderr pipe."""
import json
import os
import signal
import stat
import subprocess
import threading
import time

import pytest

from agent import Agent, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET
from test_dbus_agent import bus, busctl, wait_prop  # noqa: F401 (bus is a fixture)
from test_dbus_policy import IFACE, NAME, PATH


def provisioned(server, **extra):
    cfg = {
        "server": server_config(server),
        "device": {"name": "gateway-1"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "delivery": {"flush_interval": "100ms"},
    }
    cfg.update(extra)
    return cfg


# --- 6: not UTF-8 ----------------------------------------------------------------------------

def test_check_config_refuses_latin1_with_its_position(tmp_path):
    a = Agent(tmp_path, {"server": {"host": "192.0.2.1"}})
    a.config_path.write_bytes(b"server:\n  host: 192.0.2.1\ndevice:\n  name: caf\xe9\n")
    r = a.run_once("--check-config", timeout=30)
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert f"{a.config_path}:4:12: not valid UTF-8" in r.stdout, r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the policy lets root own")
def test_a_refused_reload_with_a_long_multibyte_value_keeps_the_bus_working(server, agents, bus):
    """The refused reload's message quotes a value cut at 60 bytes: cut inside a character, it
    made LastError unreadable, PropertiesChanged fail and Reload() callers wait for nothing."""
    agent = agents(provisioned(server, dbus={"bus": "system"}))
    agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
    wait_prop(bus, "State", lambda v: v == "running", "== running")
    value = "a" + "\u00e9" * 40  # byte 60 of the quoted value falls inside an 'é'
    agent.config["server"]["port"] = value
    agent.write_config()
    r = busctl(bus, "--timeout=10", "call", NAME, PATH, IFACE, "Reload", check=False)
    assert r.returncode != 0
    assert "must be an integer from 1 to 65535, not 'a\u00e9" in r.stderr, r.stderr
    wait_prop(bus, "LastError", lambda v: "reload refused" in v and "\u00e9...'" in v,
              "names the refused reload")
    r = busctl(bus, "--json=short", "call", "--timeout=10", NAME, PATH,
               "org.freedesktop.DBus.Properties", "GetAll", "s", IFACE, check=False)
    assert r.returncode == 0, r.stderr
    assert agent.stop() == 0


# --- 7: a reload applies every key of a system source --------------------------------------

def other_file_system():
    """A mount point whose size differs from /'s, for disk_path, or None."""
    root = os.statvfs("/")
    for path in ("/dev/shm", "/run", "/dev", "/sys/fs/cgroup"):
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        if st.f_blocks and st.f_blocks * st.f_frsize != root.f_blocks * root.f_frsize:
            return path, st.f_blocks * st.f_frsize
    return None


def test_reload_applies_system_metrics_and_disk_path(server, agents):
    source = {"name": "host", "type": "system", "interval": "1s", "metrics": ["load"]}
    agent = agents(provisioned(server, sources=[source]))
    agent.start()
    wait_until(lambda: any(p.key == "load_1" for p in server.points("gateway-1")), timeout=20,
               what=f"load readings\n{agent.log()[-2000:]}")

    # metrics [load] -> [memory]: memory keys arrive, load keys stop.
    agent.config["sources"][0] = dict(source, metrics=["memory"])
    agent.write_config()
    agent.send_signal(signal.SIGHUP)
    agent.wait_log("source 'host' changed: restarted")
    reloaded = len(server.records())
    wait_until(lambda: any(p.key == "memory_total" for p in server.points("gateway-1")),
               timeout=20, what=f"memory readings\n{agent.log()[-2000:]}")
    time.sleep(2.5)  # two more collections
    later = [r for r in server.records()[reloaded:]
             if r.get("feature") == "telemetry" and r.get("points")]
    assert later
    keys = {k for r in later for k, _, _ in r["points"]}
    assert "memory_total" in keys and not any(k.startswith("load_") for k in keys), keys

    # disk_path: the disk keys follow the new file system.
    other = other_file_system()
    if other is None:
        assert agent.stop() == 0
        return
    path, total = other
    agent.config["sources"][0] = dict(source, metrics=["disk"], disk_path=path)
    agent.write_config()
    agent.send_signal(signal.SIGHUP)
    wait_until(lambda: any(p.key == "disk_total" and p.value == total
                           for p in server.points("gateway-1")), timeout=20,
               what=f"disk_total of {path} ({total})\n{agent.log()[-2000:]}")
    assert agent.stop() == 0


# --- 8: a provisioning record of the wrong shape ---------------------------------------------

def test_provisioning_record_with_wrong_types_does_not_stop_the_start(server, agents):
    agent = agents(provisioned(server))
    agent.state_dir.mkdir(parents=True, exist_ok=True)
    token = "ProposedBeforeCrash1"
    (agent.state_dir / "provisioning.json").write_text(json.dumps(
        {"deviceName": "gateway-1", "token": token, "attempts": None, "firstAttemptMs": "3"}))
    agent.start()
    wait_until(lambda: agent.credentials(), timeout=20,
               what=f"credentials stored\n{agent.log()[-2000:]}")
    # The proposed token was kept (it may have been registered before the crash).
    assert agent.credentials()["credentialsValue"] == token
    assert server.devices()["gateway-1"] == token
    assert "attempts is missing or not a whole number" in agent.log()
    assert agent.stop() == 0


# --- 9 and 10: --check-config -----------------------------------------------------------------

def test_check_config_refuses_a_fifo_secret_file_promptly(tmp_path):
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    a = Agent(tmp_path, {"server": {"host": "192.0.2.1"},
                         "provisioning": {"key": "k", "secret_file": str(fifo)}})
    started = time.monotonic()
    r = a.run_once("--check-config", timeout=30)
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert "is not a regular file" in r.stdout, r.stdout
    assert time.monotonic() - started < 20


def test_check_config_refuses_a_vanishing_drain_rate(tmp_path):
    a = Agent(tmp_path, {"server": {"host": "192.0.2.1"}, "queue": {"drain_rate": 1e-300}})
    r = a.run_once("--check-config")
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert "queue.drain_rate: must be 0 or from 0.001" in r.stdout, r.stdout


# --- 11: file modes under umask 022 ----------------------------------------------------------

def test_queue_is_private_under_a_lax_umask_and_an_open_state_dir(server, agents):
    agent = agents(provisioned(server, sources=[
        {"name": "host", "type": "system", "interval": "1s", "metrics": ["uptime"]}]))
    agent.state_dir.mkdir(parents=True)
    agent.state_dir.chmod(0o755)
    old = os.umask(0o022)
    try:
        agent.start()
    finally:
        os.umask(old)
    wait_until(lambda: server.points("gateway-1"), timeout=20,
               what=f"readings delivered\n{agent.log()[-2000:]}")
    files = [agent.state_dir / n for n in ("queue.db", "queue.db-wal", "queue.db-shm",
                                           "credentials.json")]
    for f in files:
        if f.exists():
            mode = stat.S_IMODE(f.stat().st_mode)
            assert mode & 0o077 == 0, f"{f.name} is {oct(mode)}"
    assert (agent.state_dir / "queue.db").exists()
    assert "is accessible to other users (mode 0755)" in agent.log()
    assert agent.stop() == 0


# --- 12: stderr a closed pipe ----------------------------------------------------------------

def test_a_closed_stderr_pipe_does_not_kill_the_agent(server, agents):
    agent = agents(provisioned(server, sources=[
        {"name": "host", "type": "system", "interval": "1s", "metrics": ["uptime"]}]))
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [str(agent.binary), "--config", str(agent.config_path), "--log-target=stderr",
         "--log-level=debug"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=write_end, env=env)
    os.close(write_end)
    # Drain the pipe (a full pipe would block the agent, a different problem) until it runs.
    stop = threading.Event()

    def drain():
        import select
        while not stop.is_set():
            if select.select([read_end], [], [], 0.1)[0] and not os.read(read_end, 65536):
                break

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        wait_until(lambda: server.points("gateway-1"), timeout=20, what="readings delivered")
        stop.set()
        reader.join()
        os.close(read_end)  # every later log line now hits EPIPE
        delivered = len(server.points("gateway-1"))
        # Debug logging writes lines per reading: the agent keeps running and delivering.
        wait_until(lambda: len(server.points("gateway-1")) > delivered + 2 or proc.poll() is not None,
                   timeout=20, what="readings delivered after stderr closed")
        assert proc.poll() is None, f"agent died with {proc.returncode}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
