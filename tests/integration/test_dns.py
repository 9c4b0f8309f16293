# ctest-labels: integration dbus
"""Name resolution never stops the agent (issue 8, items 4 and 5): the real tb-agent runs in a
private mount namespace (`unshare --mount`) whose /etc/resolv.conf names a local UDP socket that
never answers and whose /etc/hosts the test rewrites. Nothing leaves the machine. Root only."""
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from agent import build_dir, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET
from tbserver import TbServer
from test_dbus_agent import bus, busctl, wait_prop  # noqa: F401 (bus is a fixture)
from test_dbus_policy import IFACE, NAME, PATH
from test_service import NotifyListener
from test_spine import counter_script

QUEUED = re.compile(r"queued (\d+) reading\(s\) from '(\w+)' ts=(\d+)")
HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


class PrivateDns:
    """Files for the agent's namespace and a DNS server that never answers."""

    def __init__(self, tmp_path):
        self.dir = tmp_path / "etc"
        self.dir.mkdir()
        pid = os.getpid()
        self.ip = f"127.78.{(pid >> 8) & 0xff}.{1 + (pid & 0xff) % 250}"
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.ip, 53))  # bound, never read: every query waits for nothing
        (self.dir / "resolv.conf").write_text(
            f"nameserver {self.ip}\noptions timeout:30 attempts:2\n")
        (self.dir / "nsswitch.conf").write_text("hosts: files dns\n")
        self.set_hosts("")
        self.wrapper = tmp_path / "tb-agent-in-ns"
        binary = build_dir() / "src" / "tb-agent"
        mounts = " && ".join(f"mount --bind {self.dir / f} /etc/{f}"
                             for f in ("resolv.conf", "nsswitch.conf", "hosts"))
        self.wrapper.write_text(
            "#!/bin/sh\n"
            f"exec unshare --mount --propagation private /bin/sh -c "
            f"'{mounts} && exec \"$0\" \"$@\"' {binary} \"$@\"\n")
        self.wrapper.chmod(0o755)

    def set_hosts(self, extra):
        # In place: the agent's bind mount is this inode.
        with open(self.dir / "hosts", "w") as f:
            f.write(HOSTS + extra)

    def close(self):
        self.sock.close()


@pytest.fixture
def dns(tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare (a private mount namespace, port 53)")
    try:
        d = PrivateDns(tmp_path)
    except OSError as e:
        pytest.skip(f"cannot bind a local DNS port: {e}")
    yield d
    d.close()


@pytest.fixture
def server(tmp_path):
    srv = TbServer(build_dir(), tmp_path, devices={"dns-1": "DNSTOKEN"},
                   provision_key=PROVISION_KEY, provision_secret=PROVISION_SECRET,
                   strategy="allow_create")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def notify(tmp_path):
    n = NotifyListener(tmp_path)
    yield n
    n.close()


def dns_config(server, tmp_path, host, **extra):
    script, _ = counter_script(tmp_path)
    cfg = {
        "server": {"host": host, "port": server.port, "request_timeout": "20s"},
        "device": {"name": "dns-1"},
        "credentials": {"access_token": "DNSTOKEN"},
        "sources": [{"name": "counter", "type": "exec", "command": [str(script)],
                     "interval": "200ms", "timeout": "200ms"}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "200ms", "backoff_max": "1s",
                     "shutdown_timeout": "2s"},
    }
    cfg.update(extra)
    return cfg


def queued_ts(agent):
    return [int(m.group(3)) for m in QUEUED.finditer(agent.log()) if m.group(2) == "counter"]


def seq_ts(server, device="dns-1"):
    return {p[1] for p in server.points(device) if p[0] == "seq"}


def start_in_ns(agent, dns, env=None):
    agent.binary = dns.wrapper
    return agent.start(env=env)


def test_a_reload_to_a_name_whose_dns_never_answers_does_not_stop_the_loop(
        server, agents, tmp_path, dns, notify, bus):
    cfg = dns_config(server, tmp_path, "127.0.0.1", dbus={"bus": "system"})
    agent = agents(cfg)
    start_in_ns(agent, dns, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000",
                                 "DBUS_SYSTEM_BUS_ADDRESS": bus})
    wait_until(lambda: len(seq_ts(server)) >= 3, what="first readings delivered")
    wait_prop(bus, "State", lambda v: v == "running", "running")

    cfg["server"]["host"] = "tb.example.com"  # the DNS server never answers
    agent.write_config(cfg)
    n_ready = len(notify.having("READY"))
    # Reload() answers at once: it does not wait for the name (it waited 40 s and more).
    t0 = time.monotonic()
    busctl(bus, "--timeout=30", "call", NAME, PATH, IFACE, "Reload")
    assert time.monotonic() - t0 < 5
    wait_until(lambda: len(notify.having("READY")) > n_ready, timeout=5,
               what="READY=1 after the reload")
    agent.wait_log("server changed to tb.example.com", timeout=5)
    # For the next 6 s the loop keeps turning: the watchdog is pinged (every second) and the
    # source keeps collecting, while the lookup waits for its DNS server.
    pings = len(notify.having("WATCHDOG"))
    queued = len(queued_ts(agent))
    time.sleep(6)
    assert len(notify.having("WATCHDOG")) >= pings + 4
    assert len(queued_ts(agent)) >= queued + 10
    # The bus is served meanwhile, and says why nothing is delivered once the lookup gives up.
    wait_prop(bus, "LastError", lambda v: "cannot resolve tb.example.com" in v,
              "names the lookup", timeout=30)
    # Another reload is handled at once too, and back on a reachable address everything queued
    # meanwhile arrives.
    cfg["server"]["host"] = "127.0.0.1"
    agent.write_config(cfg)
    n_ready = len(notify.having("READY"))
    agent.send_signal(signal.SIGHUP)
    wait_until(lambda: len(notify.having("READY")) > n_ready, timeout=5,
               what="READY=1 after the second reload")
    wanted = set(queued_ts(agent))
    wait_until(lambda: wanted <= seq_ts(server), timeout=30, what="every queued reading")
    assert agent.stop() == 0


def test_an_unresolvable_name_at_start_collects_and_delivers_once_it_resolves(
        server, agents, tmp_path, dns):
    dns.close()  # no DNS at all (a boot without network): every query is refused at once
    agent = agents(dns_config(server, tmp_path, "tb.test"))
    start_in_ns(agent, dns)
    agent.wait_log("cannot resolve tb.test", timeout=15)
    wait_until(lambda: len(queued_ts(agent)) >= 10, what="readings queued without a server")
    assert agent.running(), "an unresolvable server name must not stop the agent"
    assert not server.points("dns-1")
    log = agent.log()
    assert "-> retrying" in log, log[-2000:]
    # The network comes: the name resolves, and everything queued arrives.
    dns.set_hosts("127.0.0.1 tb.test\n")
    wanted = set(queued_ts(agent))
    wait_until(lambda: wanted <= seq_ts(server), timeout=30, what="every queued reading")
    assert agent.stop() == 0


def test_provisioning_waits_for_the_name(server, agents, tmp_path, dns, bus):
    dns.close()
    cfg = dns_config(server, tmp_path, "tb.test", dbus={"bus": "system"})
    del cfg["credentials"]
    cfg["device"] = {"name": "dns-2"}
    cfg["provisioning"] = {"key": PROVISION_KEY, "secret": PROVISION_SECRET}
    agent = agents(cfg)
    start_in_ns(agent, dns, env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
    agent.wait_log("cannot resolve tb.test", timeout=15)
    wait_prop(bus, "State", lambda v: v == "provisioning", "provisioning")
    wait_prop(bus, "LastError", lambda v: "cannot resolve tb.test" in v, "names the lookup")
    wait_until(lambda: len(queued_ts(agent)) >= 5, what="readings queued while provisioning")
    assert agent.running()
    assert agent.credentials() is None
    dns.set_hosts("127.0.0.1 tb.test\n")
    wait_until(agent.credentials, timeout=30, what="provisioned once the name resolves")
    wanted = set(queued_ts(agent))
    wait_until(lambda: wanted <= seq_ts(server, "dns-2"), timeout=30, what="every queued reading")
    wait_prop(bus, "State", lambda v: v == "running", "running")
    assert agent.stop() == 0
