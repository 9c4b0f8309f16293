# ctest-labels: integration
"""type: plugin end to end (docs/plugins.md): the example plugin built in a clean directory from
the installed SDK only (header + tb-agent-plugin.pc) and loaded by the real agent's --test;
--check-config loads every plugin and names a broken one; a good plugin's readings reach the
server; a plugin that crashes the agent is disabled after 3 strikes (the test restarts the
agent as systemd would) and every reading queued across the crashes still arrives."""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent import Agent, build_dir, server_config, source_dir, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET

TEST_PLUGINS = build_dir() / "tests" / "unit" / "sources" / "plugins"


def plugin_so(name):
    path = TEST_PLUGINS / f"{name}.so"
    if not path.exists():
        pytest.skip(f"{path} is not built (target tb_test_plugin_{name})")
    return str(path)


@pytest.fixture
def example(tmp_path):
    """The hwmon example, built from an SDK installed into a temporary prefix."""
    prefix = tmp_path / "sdk"
    r = subprocess.run(["cmake", "--install", str(build_dir()), "--prefix", str(prefix),
                        "--component", "dev"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    installed = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*") if p.is_file())
    assert installed == ["include/tb-agent/source_plugin.h",
                         "lib/pkgconfig/tb-agent-plugin.pc"] or (
        len(installed) == 2 and installed[0] == "include/tb-agent/source_plugin.h"
        and installed[1].endswith("/pkgconfig/tb-agent-plugin.pc")), installed
    pc_dir = prefix / Path(installed[1]).parent
    work = tmp_path / "clean"
    work.mkdir()
    for f in ("hwmon.c", "Makefile"):
        shutil.copy(source_dir() / "examples" / "hwmon-plugin" / f, work / f)
    env = dict(os.environ, PKG_CONFIG_PATH=str(pc_dir), PKG_CONFIG_LIBDIR=str(pc_dir))
    r = subprocess.run(["make", "CFLAGS=-O2 -Wall -Wextra -Werror"], cwd=work, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # Only the installed header was used: the include path is the temporary prefix's.
    assert f"-I{prefix}" in r.stdout.replace(f"{pc_dir}/../..", str(prefix)), r.stdout
    assert str(source_dir() / "include") not in r.stdout
    so = work / "hwmon.so"
    exported = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True,
                              text=True).stdout.split()
    assert "tb_source_plugin_v1" in exported
    assert "hwmon_collect" not in exported  # hidden visibility
    return so


def fake_hwmon(root):
    chip = root / "hwmon3"
    chip.mkdir(parents=True)
    (chip / "name").write_text("coretemp\n")
    (chip / "temp1_input").write_text("47000\n")
    (chip / "temp2_input").write_text("45500\n")
    return root


def test_example_built_from_the_installed_sdk_runs_in_test_mode(tmp_path, example):
    hwmon = fake_hwmon(tmp_path / "hwmon")
    a = Agent(tmp_path, {
        "server": {"host": "192.0.2.1"},  # never contacted
        "plugin_dir": str(example.parent),
        "sources": [
            {"name": "board", "type": "plugin", "path": "hwmon",
             "options": {"root": str(hwmon), "chip": "coretemp"}},
            {"name": "sim", "type": "plugin", "path": str(example),
             "options": {"simulate": True}},
        ]})
    r = a.run_once("--check-config")
    assert r.returncode == 0 and r.stdout == "OK\n", r.stdout + r.stderr
    r = a.run_once("--test")
    assert r.returncode == 0, r.stderr
    board, sim = json.loads(r.stdout)
    assert board["values"] == {"temp1": 47.0, "temp2": 45.5, "simulated": False}
    assert sim["values"]["simulated"] is True
    assert 30 <= sim["values"]["temp1"] <= 50
    assert "source 'board' (hwmon): reading 2 temperature input(s)" in r.stderr


def test_check_config_and_test_name_a_broken_plugin(tmp_path):
    a = Agent(tmp_path, {
        "server": {"host": "192.0.2.1"},
        "sources": [
            {"name": "good", "type": "plugin", "path": plugin_so("good"), "interval": "1m"},
            {"name": "broken", "type": "plugin", "path": plugin_so("create_fails")},
            {"name": "old", "type": "plugin", "path": plugin_so("wrong_abi")},
        ]})
    r = a.run_once("--check-config")
    assert r.returncode == 78, r.stdout + r.stderr
    assert ("source 'broken': plugin source 'broken' (test): create failed: no sensor at "
            "/dev/imaginary") in r.stdout
    assert "is built for plugin ABI 2" in r.stdout and "source 'old'" in r.stdout
    assert "source 'good'" not in r.stdout
    r = a.run_once("--test")
    assert r.returncode != 0
    batch = json.loads(r.stdout)
    assert len(batch) == 1 and batch[0]["values"]["count"] == 1  # the good one still ran
    assert "source 'broken'" in r.stderr


def died_of_segv(code, agent):
    """Killed by SIGSEGV, or in a sanitizer build ended by ASan's report of it."""
    return code == -signal.SIGSEGV or (code != 0 and "AddressSanitizer: SEGV" in agent.log())


def points_by_run(server, device):
    """count values of the good plugin, by the agent's pid."""
    runs = {}
    by_ts = {}
    for p in server.points(device):
        by_ts.setdefault(p.ts, {})[p.key] = p.value
    for values in by_ts.values():
        if "pid" in values and "count" in values:
            runs.setdefault(values["pid"], set()).add(values["count"])
    return runs


def counter_beside(server, device, bad):
    """A config with the good plugin counting every 200 ms beside the source `bad`."""
    return {
        "server": server_config(server),
        "device": {"name": device},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [
            {"name": "counter", "type": "plugin", "path": plugin_so("good"),
             "interval": "200ms"},
            bad,
        ],
        "delivery": {"flush_interval": "100ms"},
    }


def wait_for_readings_of_the_last_run(server, device, agent, at_least):
    last = agent.proc.pid
    wait_until(lambda: len(points_by_run(server, device).get(last, ())) >= at_least, timeout=60,
               what=f"readings of the last run\n{agent.log()[-3000:]}")


def assert_every_queued_reading_arrived(server, device, pids):
    """Every reading queued before each crash arrived: count 1..n without a gap, per run."""
    runs = points_by_run(server, device)
    for pid in pids:
        counts = runs.get(pid, set())
        assert counts, f"nothing from run {pid}: {runs}"
        assert counts == set(range(1, max(counts) + 1)), (pid, sorted(counts))
    return runs


def test_a_crashing_plugin_is_disabled_after_three_strikes_and_nothing_is_lost(server, agents):
    agent = agents(counter_beside(server, "plugged-1", {
        "name": "crasher", "type": "plugin", "path": plugin_so("crash"), "interval": "1s",
        "options": {"crash_after": 4}}))
    pids = []
    for strike in (1, 2, 3):
        agent.start()
        pids.append(agent.proc.pid)
        if strike == 1:
            # Provisioned and delivering before the first crash.
            wait_until(lambda: points_by_run(server, "plugged-1"), timeout=30,
                       what=f"first readings\n{agent.log()[-2000:]}")
            server.stop()  # the next runs queue everything
        code = agent.wait_exit(timeout=30)
        assert died_of_segv(code, agent), f"run {strike} ended with {code}\n{agent.log()[-2000:]}"
        time.sleep(0.1)  # systemd's RestartSec, shortened
    # The fourth start: the plugin is disabled, the agent runs on.
    agent.start()
    agent.wait_log("strike 3 of 3")
    agent.wait_log("plugin source 'crasher' (" + plugin_so("crash") + ") disabled: the agent "
                   "died inside this plugin 3 times")
    server.start()
    wait_for_readings_of_the_last_run(server, "plugged-1", agent, 10)
    assert agent.running()
    assert agent.stop() == 0
    runs = assert_every_queued_reading_arrived(server, "plugged-1", pids)
    # The crasher ran 4 times per run (crash_after 4) before each crash: about 4 s of counting.
    assert all(max(runs[pid]) >= 5 for pid in pids), {p: max(runs[p]) for p in pids}


class Watchdog:
    """systemd's side of WatchdogSec=: collects WATCHDOG=1 pings on a NOTIFY_SOCKET and sends
    SIGABRT to an agent that stopped pinging for longer than `usec`."""

    def __init__(self, tmp_path, usec):
        self.path = str(tmp_path / "notify.sock")
        self.usec = usec
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.last_ping = time.monotonic()
        self.pings = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                if b"WATCHDOG=1" in self.sock.recv(4096):
                    self.last_ping = time.monotonic()
                    self.pings += 1
            except socket.timeout:
                pass

    def env(self):
        self.last_ping = time.monotonic()  # the timer starts with the service
        return {"NOTIFY_SOCKET": self.path, "WATCHDOG_USEC": str(self.usec)}

    def expired(self):
        return time.monotonic() - self.last_ping > self.usec / 1e6

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


def test_a_hanging_plugin_is_ended_by_the_watchdog_and_disabled_after_three(
        server, agents, tmp_path):
    watchdog = Watchdog(tmp_path, 2_000_000)
    agent = agents(counter_beside(server, "plugged-2", {
        "name": "sleeper", "type": "plugin", "path": plugin_so("hang"), "interval": "1s",
        "options": {"hang_after": 2}}))
    try:
        pids = []
        for strike in (1, 2, 3):
            agent.start(env=watchdog.env())
            pids.append(agent.proc.pid)
            wait_until(watchdog.expired, timeout=30,
                       what=f"the loop to stop pinging (run {strike})\n{agent.log()[-2000:]}")
            agent.send_signal(signal.SIGABRT)  # what systemd does on a watchdog timeout
            assert agent.wait_exit(timeout=30) == -signal.SIGABRT
        agent.start(env=watchdog.env())
        agent.wait_log("strike 3 of 3")
        agent.wait_log("plugin source 'sleeper' (" + plugin_so("hang") + ") disabled")
        pings = watchdog.pings
        wait_for_readings_of_the_last_run(server, "plugged-2", agent, 15)
        assert not watchdog.expired() and watchdog.pings > pings  # the loop turns
        assert agent.stop() == 0
        assert_every_queued_reading_arrived(server, "plugged-2", pids)
    finally:
        watchdog.close()


def test_reload_forgives_a_disabled_plugin(tmp_path):
    """After 3 strikes a reload (SIGHUP) tries the plugin again (and it crashes again)."""
    a = Agent(tmp_path, {
        "server": {"host": "127.0.0.1", "port": 9},  # nothing answers; not needed
        "sources": [{"name": "crasher", "type": "plugin", "path": plugin_so("crash"),
                     "interval": "1s", "options": {"crash_after": 1}}],
        "credentials": {"access_token": "t"},
    })
    for _ in range(3):
        a.start()
        assert died_of_segv(a.wait_exit(timeout=30), a), a.log()[-2000:]
    a.start()
    a.wait_log("disabled: the agent died inside this plugin 3 times")
    time.sleep(1.5)
    assert a.running()
    a.send_signal(1)  # SIGHUP
    assert died_of_segv(a.wait_exit(timeout=30), a), a.log()[-2000:]
    # It died inside the plugin again; the strikes start over from 1.
    assert (a.state_dir / "plugin-guard").read_text() == "crasher"
    a.start()
    a.wait_log("strike 1 of 3")
    assert died_of_segv(a.wait_exit(timeout=30), a), a.log()[-2000:]
