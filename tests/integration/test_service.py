# ctest-labels: integration
"""systemd integration without systemd: a NOTIFY_SOCKET of our own sees READY=1, STATUS=,
RELOADING=1, STOPPING=1 and WATCHDOG=1; SIGHUP with a valid and an invalid config; SIGTERM."""
import json
import os
import signal
import socket
import threading
import time

import pytest

from agent import server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET


class NotifyListener:
    """Collects sd_notify datagrams like the service manager would."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages = []  # (monotonic time, {field: value})
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            fields = {}
            for line in data.decode(errors="replace").splitlines():
                k, _, v = line.partition("=")
                fields[k] = v
            self.messages.append((time.monotonic(), fields))

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()

    def having(self, key):
        return [m for _, m in self.messages if key in m]

    def statuses(self):
        return [m["STATUS"] for _, m in self.messages if "STATUS" in m]


@pytest.fixture
def notify(tmp_path):
    n = NotifyListener(tmp_path)
    yield n
    n.close()


def config(server, tmp_path, **extra):
    temp = tmp_path / "t"
    temp.write_text("5\n")
    cfg = {
        "server": server_config(server),
        "device": {"name": "svc-1"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "room", "type": "file", "path": str(temp), "key": "v",
                     "interval": "200ms"}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "200ms", "backoff_max": "1s"},
    }
    cfg.update(extra)
    return cfg


def points(server, device, key):
    return [p for p in server.points(device) if p[0] == key]


def test_ready_status_watchdog_and_stopping(server, agents, tmp_path, notify):
    agent = agents(config(server, tmp_path))
    agent.start(env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"})
    wait_until(lambda: notify.having("READY"), what="READY=1")
    wait_until(lambda: any(s.startswith("running") or s.startswith("delivering")
                           for s in notify.statuses()), what="a running STATUS")
    assert any("provisioning" in s for s in notify.statuses()), notify.statuses()
    # The watchdog is pinged at least every half period while the loop turns...
    wait_until(lambda: len(notify.having("WATCHDOG")) >= 4, what="WATCHDOG=1 pings")
    # ...and not at all while the loop is stalled.
    agent.send_signal(signal.SIGSTOP)
    time.sleep(0.3)
    n = len(notify.having("WATCHDOG"))
    time.sleep(2)
    assert len(notify.having("WATCHDOG")) == n
    agent.send_signal(signal.SIGCONT)
    wait_until(lambda: len(notify.having("WATCHDOG")) > n, what="pings after the loop resumes")
    # An outage shows in STATUS with the retry delay and the reason.
    server.command("fail-all 5.00")
    wait_until(lambda: any(s.startswith("retrying in") and "5.00" in s
                           for s in notify.statuses()), what="retrying STATUS")
    server.command("fail-all off")
    assert agent.stop() == 0
    assert notify.having("STOPPING")


def test_sighup_applies_a_valid_config_and_refuses_an_invalid_one(server, agents, tmp_path, notify):
    cfg = config(server, tmp_path)
    agent = agents(cfg)
    agent.start(env={"NOTIFY_SOCKET": notify.path})
    wait_until(lambda: len(points(server, "svc-1", "v")) >= 2, what="first readings")

    # Valid: a new source appears, the old one keeps running, nothing queued is lost.
    other = tmp_path / "other"
    other.write_text("9\n")
    cfg["sources"].append({"name": "second", "type": "file", "path": str(other), "key": "w",
                           "interval": "200ms"})
    agent.write_config(cfg)
    agent.send_signal(signal.SIGHUP)
    wait_until(lambda: notify.having("RELOADING"), what="RELOADING=1")
    wait_until(lambda: len(points(server, "svc-1", "w")) >= 2, what="readings of the new source")
    assert "configuration reloaded" in agent.log()
    assert len(notify.having("READY")) >= 2

    # Invalid: refused with its position, the agent keeps running on the old config.
    agent.config_path.write_text("server:\n  host: 127.0.0.1\n  port: [1]\n")
    n_ready = len(notify.having("READY"))
    agent.send_signal(signal.SIGHUP)
    agent.wait_log("reload refused")
    assert f"{agent.config_path}:3:" in agent.log()
    wait_until(lambda: len(notify.having("READY")) > n_ready, what="READY=1 after a refused reload")
    before = len(points(server, "svc-1", "w"))
    wait_until(lambda: len(points(server, "svc-1", "w")) > before + 2,
               what="collection goes on with the old config")
    assert agent.running()
    assert agent.stop() == 0


def test_sigterm_with_the_server_down_exits_within_the_shutdown_timeout(server, agents, tmp_path):
    cfg = config(server, tmp_path)
    cfg["delivery"]["shutdown_timeout"] = "2s"
    agent = agents(cfg)
    agent.start()
    wait_until(lambda: points(server, "svc-1", "v"), what="first readings")
    server.command("drop-all on")
    time.sleep(1)
    t0 = time.monotonic()
    assert agent.stop(timeout=15) == 0
    assert time.monotonic() - t0 < 6
    assert "stay queued" in agent.log()
