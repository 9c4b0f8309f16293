# ctest-labels: integration slow
"""Several requests in flight (issue 13, delivery.max_in_flight): the real tb-agent drains a
backlog whose readings share timestamps, is killed with -9 in the middle, and drains the rest.
Nothing is lost, no request is retransmitted, and for every (key, ts) the value that arrives
last — the one ThingsBoard keeps — is the one read last."""
import re
import sys

import pytest

from agent import server_config, wait_until

QUEUED = re.compile(r"queued (\d+) reading\(s\) from 'emit'")
LINES = 3000


@pytest.fixture
def server(tmp_path):
    from agent import build_dir
    from tbserver import TbServer
    srv = TbServer(build_dir(), tmp_path, devices={"win-1": "WINTOKEN"})
    srv.start()
    yield srv
    srv.stop()


def emitter(tmp_path):
    """An execd program printing LINES objects at once (so many share a millisecond), once."""
    script = tmp_path / "emit.py"
    done = tmp_path / "emitted"
    script.write_text(f"""import os, sys, time
if not os.path.exists({str(done)!r}):
    for n in range({LINES}):
        sys.stdout.write('{{"seq": %d, "x%d": %d}}\\n' % (n, n % 5, n))
    sys.stdout.flush()
    open({str(done)!r}, "w").close()
while True:
    time.sleep(3600)
""")
    return script


def test_kill_9_mid_drain_with_several_in_flight(server, agents, tmp_path):
    cfg = {
        "server": server_config(server, request_timeout="2s"),
        "device": {"name": "win-1"},
        "credentials": {"access_token": "WINTOKEN"},
        "sources": [{"name": "emit", "type": "execd",
                     "command": [sys.executable, str(emitter(tmp_path))]}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "100ms",
                     "backoff_max": "300ms", "max_in_flight": 16},
    }
    agent = agents(cfg)
    server.check("drop-all on")
    agent.start()
    wait_until(lambda: sum(int(m.group(1)) for m in QUEUED.finditer(agent.log())) >= 2 * LINES,
               timeout=60, what="the backlog queued")
    server.check("drop-all off")
    server.check("delay 30")  # answers take a while, so several requests are in flight
    wait_until(lambda: len(server.points("win-1")) >= LINES // 2, timeout=60,
               what="part of the backlog delivered")
    agent.kill9()
    agent.start()
    wait_until(lambda: {p[2] for p in server.points("win-1") if p[0] == "seq"} >= set(range(LINES)),
               timeout=120, what="every reading at the server")
    assert agent.stop() == 0

    points = server.points("win-1")
    seqs = [p for p in points if p[0] == "seq"]
    assert {p[2] for p in seqs} == set(range(LINES)), "a reading was lost"
    # Every record read at one ts: the last one read is the one ThingsBoard must keep.
    latest_read, last_arrived = {}, {}
    for key, ts, value, *_ in seqs:
        latest_read[ts] = max(latest_read.get(ts, -1), value)
        last_arrived[ts] = value
    shared = [ts for ts in latest_read if sum(1 for p in seqs if p[1] == ts) > 1]
    assert shared, "no readings shared a timestamp: the test proves nothing"
    assert last_arrived == latest_read
    assert server.stats().get("duplicates", 0) == 0, "a request was retransmitted"
