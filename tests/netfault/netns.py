"""Two network namespaces joined by a veth pair, for the network fault and fleet suites.

    with Link(tmp_path) as link:       # namespaces "<prefix>a" (agent) and "<prefix>s" (server)
        link.agent_ip, link.server_ip  # 10.213.K.1 and 10.213.K.2
        link.wrap(binary, "server")    # a script that runs binary in the server namespace
        link.set_hosts("10.213.K.2 tb.test\n")   # /etc/hosts as seen in the agent namespace
        link.add_server_address(3)     # 10.213.K.3 on the server side too

Nothing leaves the machine: the namespaces have only their loopback and the veth pair, and no
route out. Everything (processes left in the namespaces, /etc/netns/<name>) is removed on close,
also when a test fails. Root only; the caller skips without `ip`.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

HOSTS = "127.0.0.1 localhost\n::1 localhost\n"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available():
    """None when the suite can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    if not shutil.which("ip"):
        return "needs iproute2's ip"
    return None


class Link:
    def __init__(self, tmp_path):
        pid = os.getpid()
        self.prefix = f"tbnf{pid}"
        self.agent_ns = self.prefix + "a"
        self.server_ns = self.prefix + "s"
        self.subnet = f"10.213.{pid % 250}"
        self.agent_ip = self.subnet + ".1"
        self.server_ip = self.subnet + ".2"
        self.dir = Path(tmp_path)
        self.etc = Path("/etc/netns") / self.agent_ns
        self.created = []

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self):
        for ns in (self.agent_ns, self.server_ns):
            ip("netns", "del", ns, check=False)  # left over from a killed run with this pid
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        veth_a, veth_s = f"nf{os.getpid()}a", f"nf{os.getpid()}s"
        ip("link", "add", veth_a, "netns", self.agent_ns, "type", "veth", "peer", "name", veth_s,
           "netns", self.server_ns)
        self.veth = {self.agent_ns: veth_a, self.server_ns: veth_s}
        # Removing the first address of the subnet must keep the others (and the subnet's route):
        # test_server_address_changes moves the server from address to address.
        subprocess.run(["ip", "netns", "exec", self.server_ns, "sysctl", "-qw",
                        f"net.ipv4.conf.{veth_s}.promote_secondaries=1"], check=True)
        ip("-n", self.agent_ns, "addr", "add", self.agent_ip + "/24", "dev", veth_a)
        ip("-n", self.server_ns, "addr", "add", self.server_ip + "/24", "dev", veth_s)
        ip("-n", self.agent_ns, "link", "set", veth_a, "up")
        ip("-n", self.server_ns, "link", "set", veth_s, "up")
        # `ip netns exec` bind-mounts every file of /etc/netns/<ns>/ over /etc/<file>.
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "nsswitch.conf").write_text("hosts: files\n")
        self.set_hosts("")

    def set_hosts(self, extra):
        # Rewritten in place: a running `ip netns exec` bind mount is this inode.
        with open(self.etc / "hosts", "w") as f:
            f.write(HOSTS + extra)

    def add_server_address(self, host_octet):
        addr = f"{self.subnet}.{host_octet}"
        ip("-n", self.server_ns, "addr", "add", addr + "/24", "dev", self.veth[self.server_ns])
        return addr

    def del_server_address(self, addr):
        ip("-n", self.server_ns, "addr", "del", addr + "/24", "dev", self.veth[self.server_ns])

    def wrap(self, binary, side, name=None):
        """A script that execs `binary "$@"` in the agent's or the server's namespace (ip netns
        exec execs in place, so the script's PID becomes the binary's)."""
        ns = self.agent_ns if side == "agent" else self.server_ns
        script = self.dir / (name or f"in-{side}-{Path(binary).name}")
        script.write_text(f"#!/bin/sh\nexec ip netns exec {ns} {binary} \"$@\"\n")
        script.chmod(0o755)
        return script

    def close(self):
        for ns in self.created:
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if pids:
                time.sleep(0.2)
            ip("netns", "del", ns, check=False)
        self.created = []
        shutil.rmtree(self.etc, ignore_errors=True)
