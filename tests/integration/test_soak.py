# ctest-labels: integration soak
"""Soak (issue 14 item 5): hours of readings in minutes. Ten sources at the shortest interval,
100 ms (about 90 records/s: 75 s hold what two hours of one 1-s source make), outages
every few seconds so the queue fills and drains again and again, a reload now and then. Holds:
no leak (LeakSanitizer in the sanitizer build: the agent must exit 0), RSS flat (the second
half's peak against the first half's), the queue file flat once drained (SQLite's pages reused),
no reading dropped by the queue limits. TB_SOAK_SECONDS sets the length (default 75; docs/testing.md)."""
import os
import signal
import time

from agent import build_dir, server_config, wait_until
from tbserver import TbServer

DEVICE = "soak-1"
TOKEN = "SOAKTOKEN"


def sanitized():
    cache = build_dir() / "CMakeCache.txt"
    return cache.exists() and "TB_SANITIZE:BOOL=ON" in cache.read_text()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def queue_bytes(state_dir):
    return sum((state_dir / n).stat().st_size for n in ("queue.db", "queue.db-wal")
               if (state_dir / n).exists())


def test_soak(tmp_path, agents):
    seconds = float(os.environ.get("TB_SOAK_SECONDS", "75"))
    srv = TbServer(build_dir(), tmp_path, devices={DEVICE: TOKEN})
    srv.start()
    try:
        value = tmp_path / "value"
        value.write_text("21.5\n")
        counter = tmp_path / "count.sh"
        counter.write_text("#!/bin/sh\necho '{\"n\": 1, \"s\": \"soak\"}'\n")
        counter.chmod(0o755)
        cfg = {
            "server": server_config(srv, request_timeout="1s"),
            "device": {"name": DEVICE},
            "credentials": {"access_token": TOKEN},
            # 100 ms is the shortest interval a source may have: eight file sources make 80
            # readings/s, the system and exec sources 10 records/s more.
            "sources": [
                {"name": f"fast{i}", "type": "file", "path": str(value), "key": "t",
                 "interval": "100ms"} for i in range(8)
            ] + [
                {"name": "sys", "type": "system", "interval": "100ms"},
                {"name": "exec", "type": "exec", "command": [str(counter)],
                 "interval": "100ms", "timeout": "100ms"},
            ],
            "delivery": {"flush_interval": "100ms", "backoff_initial": "100ms",
                         "backoff_max": "500ms", "shutdown_timeout": "5s"},
        }
        agent = agents(cfg)
        env = {}
        if sanitized():
            # Small quarantine so RSS reflects the agent, not ASan's delayed reuse.
            env["ASAN_OPTIONS"] = (os.environ.get("ASAN_OPTIONS", "detect_leaks=1") +
                                   ":quarantine_size_mb=16:detect_leaks=1")
        agent.start(env=env, log_level="info")
        wait_until(lambda: srv.points(DEVICE), timeout=20, what="first readings")
        start = time.monotonic()
        samples, drained_sizes, cycle = [], [], 0
        while time.monotonic() - start < seconds:
            cycle += 1
            srv.check("drop-all on")          # an outage: the queue fills...
            time.sleep(3)
            srv.check("drop-all off")         # ...and drains
            if cycle % 4 == 0:
                agent.send_signal(signal.SIGHUP)  # a reload with nothing changed
            end = time.monotonic() + 20
            while time.monotonic() < end:
                samples.append((time.monotonic() - start, rss_kib(agent.proc.pid)))
                time.sleep(0.5)
                if time.monotonic() - start > seconds or len(samples) % 6 == 0:
                    break
            drained_sizes.append(queue_bytes(agent.state_dir))
            assert agent.running(), agent.log()[-3000:]
        time.sleep(2)
        assert agent.stop() == 0, "exit code (LeakSanitizer fails it on a leak)\n" + \
            agent.log()[-3000:]
        log = agent.log()
        assert "queue limits reached" not in log
        assert "LeakSanitizer" not in log and "AddressSanitizer" not in log, log[-5000:]
        # RSS flat: the second half's peak within 15 % (+2 MiB) of the first half's.
        half = seconds / 2
        first = max(r for t, r in samples if t < half)
        second = max(r for t, r in samples if t >= half)
        assert second <= first * 1.15 + 2048, f"RSS grew: {first} KiB -> {second} KiB"
        # Queue file flat: the outages are alike, so drained sizes do not trend up.
        early = max(drained_sizes[:3])
        assert drained_sizes[-1] <= early * 1.25 + 65536, \
            f"queue file grew across drains: {drained_sizes}"
        points = srv.points(DEVICE)
        fast = [p for p in points if p[0] == "t"]
        assert len(fast) > seconds * 40, f"only {len(fast)} file readings in {seconds} s"
        print(f"soak {seconds:.0f} s: {len(points)} points, {cycle} outages, RSS "
              f"{first}->{second} KiB, drained queue sizes {drained_sizes}")
    finally:
        srv.stop()
