"""Shared pieces of the network fault and fleet suites: the fault proxy, RSS sampling, and the
check that every reading arrived exactly as produced."""

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "integration"))

from agent import wait_until  # noqa: E402

PROXY = HERE.parents[0] / "tools" / "udp_proxy.py"
QUEUED = re.compile(r"queued (\d+) reading\(s\) from '(\w+)' ts=(\d+)")


class FaultProxy:
    """tests/tools/udp_proxy.py in the server's namespace, listening on one of its addresses (so
    its answers come from the address the agent asked)."""

    def __init__(self, link, upstream_port, address=None, port=5683, seed=1, args=()):
        address = address or link.server_ip
        self.control_path = link.dir / f"proxy-{address}.sock"
        self.port = port
        argv = ["ip", "netns", "exec", link.server_ns, sys.executable, str(PROXY),
                "--listen", f"{address}:{port}", "--upstream", f"127.0.0.1:{upstream_port}",
                "--seed", str(seed), "--control", str(self.control_path), *args]
        self.err = open(link.dir / f"proxy-{address}.stderr.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"udp_proxy did not start: {line!r}")
        wait_until(self.control_path.exists, timeout=10, what="the proxy's control socket")
        self.final_stats = None

    def command(self, line):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.control_path))
            s.sendall(line.encode() + b"\n")
            reply = s.makefile().readline().strip()
        if reply.startswith("error"):
            raise RuntimeError(f"udp_proxy {line!r}: {reply}")
        return reply

    def set(self, direction="both", **params):
        for key, value in params.items():
            self.command(f"set {direction} {key.replace('_', '-')} {value}")

    def clear(self):
        self.set(loss=0, delay=0, jitter=0, reorder=0, duplicate=0)

    def stats(self):
        return json.loads(self.command("stats"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            last = [ln for ln in out.splitlines() if ln.startswith("{")]
            self.final_stats = json.loads(last[-1]) if last else None
        self.err.close()
        return self.final_stats


def rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler:
    """Samples a process's RSS every `period` seconds on a thread until stop()."""

    def __init__(self, pid, period=1.0):
        self.pid = pid
        self.samples = []  # (monotonic seconds, KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period):
        while not self._stop.wait(period):
            v = rss_kib(self.pid)
            if v is not None:
                self.samples.append((time.monotonic(), v))

    def mark(self):
        v = rss_kib(self.pid)
        if v is not None:
            self.samples.append((time.monotonic(), v))
        return v

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.samples


def counter_script(dir_, name="counter"):
    """An exec source program counting its runs: {"seq": n, "label": "run-n"}; the file holds n."""
    state = Path(dir_) / f"{name}.n"
    script = Path(dir_) / f"{name}.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {state} 2>/dev/null || echo 0)\n"
        "n=$((n+1))\n"
        f"echo $n > {state}.tmp && mv {state}.tmp {state}\n"
        'printf \'{"seq": %d, "label": "run-%d"}\\n\' $n $n\n')
    script.chmod(0o755)
    return script, state


def produced(agent, source="counter"):
    """Timestamps of the readings the agent queued from `source`, in order (its debug log)."""
    return [int(m.group(3)) for m in QUEUED.finditer(agent.log()) if m.group(2) == source]


def stored(server, device):
    """ts -> {key: value} for every telemetry point the server stored for device. Raises when a
    (ts, key) was stored twice with different values: a resent reading must be the same one."""
    out = {}
    for p in server.points(device):
        row = out.setdefault(p.ts, {})
        if p.key in row and row[p.key] != p.value:
            raise AssertionError(f"ts {p.ts} key {p.key}: stored {row[p.key]!r} and {p.value!r}")
        row[p.key] = p.value
    return out


def check_exact(produced_ts, rows):
    """Every produced reading is stored, and as produced: the counter's n-th run has seq n and
    label run-n, seq increases with the timestamp (a run that timed out under load leaves a gap in
    seq, not in what was produced), and no seq is stored under two timestamps."""
    missing = [ts for ts in produced_ts if ts not in rows]
    assert not missing, f"{len(missing)} of {len(produced_ts)} readings never arrived: {missing[:10]}"
    seqs = []
    for ts in produced_ts:
        row = rows[ts]
        n = row.get("seq")
        assert isinstance(n, int), f"ts {ts}: {row}"
        assert row.get("label") == f"run-{n}", f"ts {ts}: {row}"
        seqs.append(n)
    assert all(a < b for a, b in zip(seqs, seqs[1:])), "seq does not increase with ts"
    by_seq = {}
    for ts, row in rows.items():
        if "seq" in row:
            assert by_seq.setdefault(row["seq"], ts) == ts, f"seq {row['seq']} stored at two ts"
