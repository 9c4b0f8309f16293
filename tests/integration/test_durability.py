# ctest-labels: integration slow
"""Nothing lost (issue 3): kill -9 at random moments, outages past the age limit, a corrupt
queue file, a full state directory — the real tb-agent against tb-test-server."""
import contextlib
import os
import random
import re
import subprocess
import time

import pytest

from agent import server_config, wait_until
from test_spine import counter_script

QUEUED = re.compile(r"queued (\d+) reading\(s\) from '(\w+)' ts=(\d+)")


def durable_config(server, tmp_path, script, **delivery):
    d = {"flush_interval": "100ms", "backoff_initial": "100ms", "backoff_max": "500ms",
         "shutdown_timeout": "2s"}
    d.update(delivery)
    return {
        "server": server_config(server, request_timeout="1s"),
        "device": {"name": "dur-1"},
        "credentials": {"access_token": "DURTOKEN"},
        "sources": [{"name": "counter", "type": "exec", "command": [str(script)],
                     "interval": "100ms", "timeout": "100ms"}],
        "delivery": d,
    }


def seq_points(server):
    return [(p[1], p[2]) for p in server.points("dur-1") if p[0] == "seq"]


@pytest.fixture
def server(tmp_path):
    from agent import build_dir
    from tbserver import TbServer
    srv = TbServer(build_dir(), tmp_path, devices={"dur-1": "DURTOKEN"})
    srv.start()
    yield srv
    srv.stop()


def test_kill_9_at_random_moments_loses_no_queued_reading(server, agents, tmp_path):
    rng = random.Random(20261125)
    script, _ = counter_script(tmp_path)
    agent = agents(durable_config(server, tmp_path, script))
    for round_ in range(20):
        # Vary what the server does, so kills land during collection, delivery and retries.
        mode = rng.choice(["ok", "ok", "drop", "fail", "slow"])
        server.command({"ok": "fail-all off", "drop": "drop 3", "fail": "fail 4 5.00",
                        "slow": "delay 300"}[mode])
        agent.start()
        time.sleep(rng.uniform(0.15, 1.2))
        agent.kill9()
        server.command("delay 0")
        server.command("drop-all off")
        server.command("fail-all off")
    queued_ts = [int(m.group(3)) for m in QUEUED.finditer(agent.log())
                 if m.group(2) == "counter"]
    assert len(queued_ts) > 50, "the rounds should have queued many readings"
    # One clean run drains everything that was queued. It must be up before it is stopped (the
    # readings may all be at the server already, and a SIGTERM before the agent has set up its
    # signal handling ends it as any process).
    runs = agent.log().count("tb-agent running")
    agent.start()
    wait_until(lambda: agent.log().count("tb-agent running") > runs, what="the agent running")
    wait_until(lambda: set(queued_ts) <= {ts for ts, _ in seq_points(server)}, timeout=30,
               what="every queued reading at the server")
    assert agent.stop() == 0
    # Redelivery after a kill may duplicate a reading, but always with its own ts.
    by_ts = {}
    for ts, v in seq_points(server):
        by_ts.setdefault(ts, set()).add(v)
    assert all(len(vs) == 1 for vs in by_ts.values())


def test_an_outage_past_max_age_drops_exactly_the_oldest(server, agents, tmp_path):
    script, state = counter_script(tmp_path)
    cfg = durable_config(server, tmp_path, script, backoff_initial="100ms", backoff_max="300ms")
    cfg["queue"] = {"max_age": "2s"}
    agent = agents(cfg)
    agent.start()
    wait_until(lambda: len(seq_points(server)) >= 3, what="first readings")
    server.command("drop-all on")
    time.sleep(5)  # readings older than 2 s age out of the queue meanwhile
    server.command("drop-all off")
    time.sleep(2)
    assert agent.stop() == 0
    produced = int(state.read_text())
    # The stop may cut the last run short: the script writes its count before it prints the
    # reading, and a collection still running at SIGTERM is abandoned. Such a run never became a
    # record, and the agent's log says so: one "queued" line per record it stored.
    queued = len([m for m in QUEUED.finditer(agent.log()) if m.group(2) == "counter"])
    assert queued in (produced, produced - 1), (queued, produced)
    produced = queued
    got = sorted({v for _, v in seq_points(server)})
    missing = sorted(set(range(1, produced + 1)) - set(got))
    assert missing, "a 5 s outage with max_age 2s must drop something"
    # Exactly the oldest: one contiguous run of the readings queued during the outage.
    assert missing == list(range(missing[0], missing[-1] + 1))
    assert got[0] == 1 and max(got) == produced
    # Counted: 3 readings (seq, ok, label) per missing record.
    m = re.search(r"(\d+) dropped since start", agent.log())
    assert m and int(m.group(1)) == 3 * len(missing), (m and m.group(0), len(missing))
    assert "queue limits reached" in agent.log()


def test_a_corrupt_queue_file_is_moved_aside_and_the_agent_goes_on(server, agents, tmp_path):
    script, _ = counter_script(tmp_path)
    agent = agents(durable_config(server, tmp_path, script))
    agent.state_dir.mkdir(parents=True)
    (agent.state_dir / "queue.db").write_bytes(b"this is not an SQLite database" * 100)
    agent.start()
    wait_until(lambda: len(seq_points(server)) >= 3, what="readings with a fresh queue")
    assert agent.stop() == 0
    aside = [p.name for p in agent.state_dir.iterdir() if p.name.startswith("queue.db.corrupt")]
    assert aside, list(agent.state_dir.iterdir())
    assert "queue.db" in agent.log() and "corrupt" in agent.log().lower()


@contextlib.contextmanager
def scratch_mount(path, size="1m"):
    """A tmpfs of its own at `path` (needs root: skips otherwise), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@contextlib.contextmanager
def full_state_dir(server, agents, tmp_path):
    """An agent whose state dir (a 1 MiB tmpfs) fills up while the server takes nothing: yields
    (agent, filler file, counter state) once the agent said it cannot queue readings."""
    with scratch_mount(tmp_path / "small") as state:
        script, counter_state = counter_script(tmp_path)
        cfg = durable_config(server, tmp_path, script)
        cfg["state_dir"] = str(state)
        agent = agents(cfg)
        agent.start()
        wait_until(lambda: len(seq_points(server)) >= 3, what="first readings")
        server.command("drop-all on")  # readings pile up in the queue...
        time.sleep(1)
        filler = state / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=1024"],
                       capture_output=True)  # ...until the disk is full
        agent.wait_log("cannot queue readings", timeout=20)
        yield agent, filler, counter_state


def test_a_full_state_dir_is_reported_and_recovers(server, agents, tmp_path):
    with full_state_dir(server, agents, tmp_path) as (agent, filler, _):
        assert agent.running(), "a full disk must not crash the agent"
        filler.unlink()
        server.command("drop-all off")
        agent.wait_log("queueing readings works again", timeout=20)
        n = len(seq_points(server))
        wait_until(lambda: len(seq_points(server)) > n + 3, what="delivery after space returns")
        assert agent.stop() == 0


RECOVERED = "removing delivered readings from the queue works again"


def ack_errors(log):
    return sum(1 for line in log.splitlines() if " error " in line and "cannot remove" in line)


def test_a_full_disk_at_ack_pauses_delivery_instead_of_a_resend_storm(server, agents, tmp_path):
    """Issue 8 item 2: the server takes a batch but the full state disk cannot remove it from the
    queue. The batch stays queued and is sent again only after a backoff; nothing is counted as
    delivered twice; one log line for the episode; delivery recovers when space returns."""
    with full_state_dir(server, agents, tmp_path) as (agent, filler, counter_state):
        telemetry = lambda: sum(1 for r in server.records() if r.get("feature") == "telemetry")
        delivered = len(seq_points(server))
        server.command("drop-all off")  # the server takes everything; the queue cannot forget it
        wait_until(lambda: len(seq_points(server)) > delivered, timeout=20,
                   what="the server taking a batch")
        before = telemetry()
        time.sleep(5)
        during = telemetry() - before
        # backoff_max is 500 ms: about ten resends in 5 s, never thousands.
        assert during <= 60, f"{during} telemetry requests in 5 s while the disk was full"
        assert agent.running()
        # One error line per episode; an episode ends with the first ack that works.
        log = agent.log()
        assert ack_errors(log) == 1 + log.count(RECOVERED), "one error line per episode"
        assert "delivery failed (cannot remove" not in log
        filler.unlink()
        agent.wait_log(RECOVERED, timeout=20)
        agent.wait_log("queueing readings works again", timeout=20)
        n = len(seq_points(server))
        wait_until(lambda: len(seq_points(server)) > n + 3, what="delivery after space returns")
        assert agent.stop() == 0
        produced = int(counter_state.read_text())
        log = agent.log()
        m = re.search(r"(\d+) reading\(s\) delivered and", log)
        assert m, log[-2000:]
        # Three readings per run; each counted once, when the queue forgot it.
        assert int(m.group(1)) <= 3 * produced, (m.group(0), produced)
        assert ack_errors(log) == log.count(RECOVERED) >= 1
