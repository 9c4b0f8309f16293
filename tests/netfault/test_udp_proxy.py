# ctest-labels: netfault
"""tests/tools/udp_proxy.py on loopback: what the fault suites rely on it to do."""
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from faultlink import PROXY


class Echo:
    """A UDP echo server: answers every datagram with the same bytes."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.peers = set()

    def pump(self):
        self.sock.setblocking(False)
        try:
            while True:
                data, peer = self.sock.recvfrom(4096)
                self.peers.add(peer)
                self.sock.sendto(data, peer)
        except BlockingIOError:
            pass


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.sock.close()


def start(echo, tmp_path, *args):
    ctl = tmp_path / "ctl.sock"
    p = subprocess.Popen([sys.executable, str(PROXY), "--listen", "127.0.0.1:0", "--upstream",
                          f"127.0.0.1:{echo.port}", "--seed", "7", "--control", str(ctl), *args],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("listening on 127.0.0.1:"), line
    return p, int(line.rsplit(":", 1)[1]), ctl


def command(ctl, line):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(ctl))
        s.sendall(line.encode() + b"\n")
        return s.makefile().readline().strip()


def exchange(echo, port, n, clients=1, wait=1.0, pace=0):
    """Sends n numbered datagrams from `clients` sockets; returns what came back, in order.

    pace > 0: a pause of that many seconds after every 10 datagrams, so that neither the proxy's
    nor the echo's socket buffer overflows on a loaded machine (a datagram the kernel drops is
    one the proxy never draws a random number for, which shifts every later loss decision)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(clients)]
    for s in socks:
        s.setblocking(False)
    got = []

    def receive():
        for s in socks:
            try:
                while True:
                    got.append(int(s.recv(100)))
            except BlockingIOError:
                pass

    for i in range(n):
        socks[i % clients].sendto(str(i).encode(), ("127.0.0.1", port))
        echo.pump()
        if pace and i % 10 == 9:
            time.sleep(pace)
            echo.pump()
            receive()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        echo.pump()
        receive()
        time.sleep(0.005)
    for s in socks:
        s.close()
    return got


def stop(p):
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


def test_clean_link_forwards_everything_and_keeps_clients_apart(echo, tmp_path):
    p, port, _ = start(echo, tmp_path)
    got = exchange(echo, port, 200, clients=4)
    stats = stop(p)
    assert sorted(got) == list(range(200))
    assert len(echo.peers) == 4, "one upstream socket per client"
    assert stats["up"]["forwarded"] == 200 and stats["down"]["forwarded"] == 200
    assert stats["clients_total"] == 4


def test_loss_is_per_direction_and_repeatable_with_a_seed(echo, tmp_path):
    results = []
    for _ in range(2):
        p, port, _ = start(echo, tmp_path, "--loss", "30")
        got = exchange(echo, port, 1000, wait=3.0, pace=0.005)
        stats = stop(p)
        results.append(got)
        # 30 % each way: about 49 % of round trips survive.
        assert 250 <= stats["up"]["lost"] <= 350, stats
        assert 0.4 < len(got) / 1000 < 0.6
    assert results[0] == results[1], "the same seed loses the same datagrams"


def test_delay_jitter_reorder_and_duplicate(echo, tmp_path):
    p, port, _ = start(echo, tmp_path, "--up-delay", "150", "--up-jitter", "100",
                       "--duplicate", "20", "--reorder", "20", "--reorder-gap", "100")
    t0 = time.monotonic()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"0", ("127.0.0.1", port))
    s.settimeout(5)
    while True:  # the first answer comes after at least 50 ms (150 - 100)
        echo.pump()
        try:
            s.settimeout(0.005)
            s.recv(100)
            break
        except socket.timeout:
            assert time.monotonic() - t0 < 5
    assert time.monotonic() - t0 >= 0.05
    s.close()
    got = exchange(echo, port, 300, wait=2.0)
    stats = stop(p)
    assert len(got) > 300, "duplicates arrive too"
    assert got != sorted(got), "jitter and reordering change the order"
    assert set(got) == set(range(300))
    assert stats["up"]["duplicated"] > 0 and stats["down"]["reordered"] > 0


def test_link_down_and_up_at_run_time(echo, tmp_path):
    p, port, ctl = start(echo, tmp_path)
    assert command(ctl, "down") == "ok"
    assert exchange(echo, port, 20) == []
    assert command(ctl, "up") == "ok"
    assert len(exchange(echo, port, 20)) == 20
    p.send_signal(signal.SIGUSR1)
    time.sleep(0.3)
    assert exchange(echo, port, 20) == []
    p.send_signal(signal.SIGUSR2)
    time.sleep(0.3)
    assert len(exchange(echo, port, 20)) == 20
    assert command(ctl, "set both loss 100") == "ok"
    assert exchange(echo, port, 20) == []
    assert command(ctl, "set up loss 101").startswith("error")
    assert command(ctl, "bogus").startswith("error")
    stats = json.loads(command(ctl, "stats"))
    assert stats["up"]["dropped_down"] == 40 and stats["up"]["lost"] == 20
    stop(p)


def test_upstream_changes_at_run_time(echo, tmp_path):
    p, port, ctl = start(echo, tmp_path)
    assert len(exchange(echo, port, 10)) == 10
    other = Echo()
    try:
        assert command(ctl, f"upstream 127.0.0.1:{other.port}") == "ok"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.01)
        answers = 0
        for i in range(10):
            s.sendto(b"%d" % i, ("127.0.0.1", port))
            for _ in range(100):
                other.pump()
                try:
                    s.recv(100)
                    answers += 1
                    break
                except socket.timeout:
                    pass
        s.close()
        assert answers == 10 and other.peers, "the new upstream answers"
    finally:
        other.sock.close()
    stop(p)


def test_rebind_gives_every_client_a_new_source_port(echo, tmp_path):
    p, port, ctl = start(echo, tmp_path)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.01)

    def round_trip(i):
        s.sendto(b"%d" % i, ("127.0.0.1", port))
        for _ in range(300):
            echo.pump()
            try:
                return int(s.recv(100))
            except socket.timeout:
                pass
        return None

    try:
        assert round_trip(1) == 1
        before = set(echo.peers)
        assert command(ctl, "rebind") == "ok"
        assert round_trip(2) == 2, "answers still reach the client"
        assert len(echo.peers - before) == 1, "the upstream saw a new source port"
        assert json.loads(command(ctl, "stats"))["rebinds"] == 1
        assert command(ctl, "rebind now").startswith("error")
    finally:
        s.close()
    stop(p)
