# ctest-labels: fleet
"""A fleet on one machine (issue 14, item 6): many real tb-agents, each with its own state dir
and device name, against one tb-test-server on loopback.

1. The provisioning storm: all agents start at once and every one is provisioned.
2. The server goes away (stopped) for an outage and comes back on the same port and state: the
   retry wave is spread. Reported: the peak 1-second request rate (every request datagram the
   server received, from its record) in the minute after the server returned, over the mean
   rate of that minute; the same figure for a window before the outage is the baseline. With
   full-jitter backoff the figure is a property of the jitter distribution, not of the machine's
   speed, but a sample of it: with 100 agents one busy second moves it by 0.1 or more (a CI run
   measured 2.02 where other runs gave 1.5). It is a figure, reported (printed and written to
   fleet-figure.json) like a benchmark's; the test asserts it only when TB_FLEET_MAX_RATIO is
   set (the project's rule: figures are met in measurements, never in timed tests).
3. Nothing is lost: every reading each agent produced arrives, exactly as produced.

The sources collect every TB_FLEET_INTERVAL (default 1s). Agents started in the same second
collect in the same second of every interval, for ever; with a longer interval the steady
traffic itself comes in bursts (every agent in one second out of each interval) and the figure
measures those bursts, not the retry wave (docs/testing.md, "Fleet").

TB_FLEET_AGENTS (default 200) and TB_FLEET_OUTAGE_S (default 60) size the run: the issue's full
size, about 4 minutes on two cores. TB_FLEET_BASELINE_S (default 30) and TB_FLEET_WINDOW_S
(default 60) are the windows the figure is taken over before the outage and after the return.
Root not needed.
"""
import json
import os
import time
from collections import Counter

import pytest

from faultlink import produced, wait_until
from agent import Agent, build_dir
from tbserver import TbServer

AGENTS = int(os.environ.get("TB_FLEET_AGENTS", "200"))
OUTAGE_S = float(os.environ.get("TB_FLEET_OUTAGE_S", "60"))
MAX_RATIO = float(os.environ["TB_FLEET_MAX_RATIO"]) if os.environ.get("TB_FLEET_MAX_RATIO") else None
INTERVAL = os.environ.get("TB_FLEET_INTERVAL", "1s")
BASELINE_S = int(os.environ.get("TB_FLEET_BASELINE_S", "30"))
KEY, SECRET = "fleet-key", "fleet-secret"
WINDOW_S = int(os.environ.get("TB_FLEET_WINDOW_S", "60"))


def device(i):
    return f"fleet-{i:03d}"


@pytest.fixture
def server(tmp_path):
    srv = TbServer(build_dir(), tmp_path, provision_key=KEY, provision_secret=SECRET,
                   strategy="allow_create")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def fleet(tmp_path, server):
    reading = tmp_path / "reading"
    reading.write_text("21.5\n")
    made = []
    for i in range(AGENTS):
        cfg = {
            "server": {"host": "127.0.0.1", "port": server.port},
            "device": {"name": device(i)},
            "provisioning": {"key": KEY, "secret": SECRET},
            "sources": [{"name": "temp", "type": "file", "path": str(reading), "key": "t",
                         "interval": INTERVAL}],
            "delivery": {"shutdown_timeout": "1s"},  # the rest as shipped: 1 s, doubling to 5 min
        }
        made.append(Agent(tmp_path / "fleet", cfg, device(i)))
    yield made
    for a in made:
        if a.running():
            a.proc.kill()
            a.proc.wait()


def stored_by_device(server):
    """device -> {ts: {key: value}}, from one read of the server's record."""
    out = {}
    for p in server.points():
        out.setdefault(p.device, {}).setdefault(p.ts, {})[p.key] = p.value
    return out


def peak_over_mean(server, start_ms, seconds):
    """(peak requests in one second, mean per second, ratio, per-second counts) for the window
    [start_ms, start_ms + seconds s) of the server's record."""
    counts = Counter()
    for r in server.records():
        k = int((r["t"] - start_ms) // 1000)
        if 0 <= k < seconds:
            counts[k] += 1
    per_second = [counts.get(k, 0) for k in range(seconds)]
    peak = max(per_second)
    mean = sum(per_second) / seconds
    return peak, mean, peak / mean if mean else float("inf"), per_second


def test_fleet_storm_outage_and_retry_wave(server, fleet):
    # 1. Provisioning storm.
    for a in fleet:
        a.start()
    wait_until(lambda: all(a.credentials() for a in fleet), timeout=180, interval=1,
               what="every agent provisioned")
    assert sorted(server.devices()) == sorted(device(i) for i in range(AGENTS))
    assert all(a.running() for a in fleet)
    wait_until(lambda: len(stored_by_device(server)) == AGENTS, timeout=60, interval=1,
               what="telemetry from every agent")

    # Steady state before the outage: the baseline of the figure.
    base_ms = time.time() * 1000
    time.sleep(BASELINE_S)
    b_peak, b_mean, b_ratio, _ = peak_over_mean(server, base_ms, BASELINE_S)

    # 2. The server goes away and comes back.
    server.stop()
    time.sleep(OUTAGE_S)
    back_ms = time.time() * 1000
    server.start()
    time.sleep(WINDOW_S + 1)
    peak, mean, ratio, per_second = peak_over_mean(server, back_ms, WINDOW_S)
    print(f"\n{AGENTS} agents, sources every {INTERVAL}, {OUTAGE_S:.0f} s outage: in the "
          f"{WINDOW_S} s after the server returned, peak {peak} requests/s (second "
          f"{per_second.index(peak)}), mean {mean:.1f}/s: peak/mean = {ratio:.2f} "
          f"(before the outage: peak {b_peak}, mean {b_mean:.1f}/s, {b_ratio:.2f})")
    print("requests per second after the return:", per_second)
    # Also kept in the build directory, for CI logs that do not show a passing test's output.
    figure = {"agents": AGENTS, "interval": INTERVAL, "outage_s": OUTAGE_S, "peak": peak,
              "mean": round(mean, 2), "ratio": round(ratio, 3), "baseline_ratio": round(b_ratio, 3),
              "per_second": per_second}
    with open(build_dir() / "fleet-figure.json", "w") as f:
        json.dump(figure, f)

    # 3. Nothing lost.
    wanted = {i: produced(a, "temp") for i, a in enumerate(fleet)}

    def all_arrived():
        have = stored_by_device(server)
        return all(set(ts) <= have.get(device(i), {}).keys() for i, ts in wanted.items())

    wait_until(all_arrived, timeout=400, interval=2, what="every reading of every agent")
    for a in fleet:
        assert a.running(), a.log()[-2000:]
    have = stored_by_device(server)
    for i in wanted:
        rows = have[device(i)]
        assert all(rows[ts] == {"t": 21.5} for ts in wanted[i]), device(i)
    if MAX_RATIO is not None:
        assert ratio <= MAX_RATIO, f"retry wave peak/mean {ratio:.2f} > {MAX_RATIO}"
