# ctest-labels: integration hostfault
"""Process and host faults (issue 14 item 3): kill -9 loops during provisioning and reloads; a
read-only or vanishing state directory; a wall clock that steps by hours, and a board that boots
in 1970 until NTP sets its clock. The real tb-agent against tb-test-server. The wall clock is
stepped for the agent alone (fakeclock.c, LD_PRELOAD), so the machine's clock is never touched. kill -9 during delivery and a full state disk are in test_durability.py; the map of
every fault to its test is in docs/testing.md "Fault suites"."""
import json
import os
import random
import re
import signal
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent import build_dir, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET, registered_server
from test_durability import QUEUED, scratch_mount
from test_spine import counter_script

TOKEN = "HOSTTOKEN"
DEVICE = "host-1"
HOUR_MS = 3600 * 1000


@pytest.fixture
def server(tmp_path):
    srv = registered_server(tmp_path, DEVICE, TOKEN)
    yield srv
    srv.stop()


def config(server, script, interval="100ms", request_timeout="1s", **extra):
    cfg = {
        "server": server_config(server, request_timeout=request_timeout),
        "device": {"name": DEVICE},
        "credentials": {"access_token": TOKEN},
        "sources": [{"name": "counter", "type": "exec", "command": [str(script)],
                     "interval": interval, "timeout": interval}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "100ms",
                     "backoff_max": "500ms", "shutdown_timeout": "2s"},
    }
    cfg.update(extra)
    return cfg


def seq_points(server, device=DEVICE):
    return [(p[1], p[2]) for p in server.points(device) if p[0] == "seq"]


def queued_ts(agent):
    return [int(m.group(3)) for m in QUEUED.finditer(agent.log()) if m.group(2) == "counter"]


def all_arrive(server, agent, timeout=30):
    """Every record the agent queued (one debug line each) is at the server: as many distinct
    seq values. The counter's own count can run ahead: a run killed by the source timeout
    counted but printed nothing."""
    n = len(queued_ts(agent))
    wait_until(lambda: len({v for _, v in seq_points(server)}) >= n, timeout=timeout,
               what=f"the {n} queued readings at the server")
    return n


# ---- kill -9 loops ----------------------------------------------------------------------------

def test_kill_9_during_provisioning_never_half_writes_and_provisions_once(server, agents,
                                                                           tmp_path):
    rng = random.Random(14)
    temp = tmp_path / "v"
    temp.write_text("1\n")
    cfg = {
        "server": server_config(server, request_timeout="1s"),
        "device": {"name": "prov-kill"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "v", "type": "file", "path": str(temp), "key": "x",
                     "interval": "200ms"}],
        "delivery": {"backoff_initial": "100ms", "backoff_max": "500ms"},
    }
    agent = agents(cfg)
    for round_ in range(15):
        # A slow answer on some rounds widens the window between request and stored answer.
        server.check(rng.choice(["delay 0", "delay 0", "delay 300", "delay 700"]))
        agent.start()
        time.sleep(rng.uniform(0.02, 0.6))
        agent.kill9()
        for name in ("credentials.json", "provisioning.json"):
            p = agent.state_dir / name
            if p.exists():  # whole or absent, never half-written
                json.loads(p.read_text())
        assert not [p for p in agent.state_dir.glob("*") if ".tmp" in p.name or "~" in p.name], \
            list(agent.state_dir.iterdir())
        if agent.credentials():
            assert agent.credentials()["credentialsValue"] == server.devices()["prov-kill"]
    server.check("delay 0")
    runs = agent.log().count("tb-agent running")
    points = len(server.points("prov-kill"))
    agent.start()
    creds = wait_until(agent.credentials, timeout=30, what="credentials")
    wait_until(lambda: agent.log().count("tb-agent running") > runs, what="the last start")
    wait_until(lambda: len(server.points("prov-kill")) > points, timeout=20,
               what="telemetry with the provisioned token")
    assert agent.stop() == 0
    assert creds["credentialsValue"] == server.devices()["prov-kill"]
    created = [r for r in server.records() if r.get("provision_status") == "SUCCESS"]
    assert len(created) == 1, f"provisioned {len(created)} times"
    assert server.stats().get("provisioned", 0) == 1


def test_kill_9_during_reloads_loses_nothing(server, agents, tmp_path):
    rng = random.Random(1414)
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script))
    for round_ in range(12):
        server.check(rng.choice(["drop-all off", "drop-all off", "drop-all on"]))
        agent.start()
        wait_until(lambda: agent.log().count("tb-agent running") > round_, timeout=10,
                   what="start")
        time.sleep(rng.uniform(0.1, 0.5))  # collect and deliver a little
        cfg = agent.config
        cfg["sources"][0]["interval"] = cfg["sources"][0]["timeout"] = rng.choice(
            ["100ms", "150ms", "200ms"])
        cfg["delivery"]["max_batch_size"] = rng.choice(["512B", "4KiB", "64KiB"])
        agent.write_config(cfg)
        agent.send_signal(signal.SIGHUP)
        time.sleep(rng.uniform(0.0, 0.3))  # kill while reloading, or just after
        agent.kill9()
    server.check("drop-all off")
    ts = queued_ts(agent)
    assert len(ts) > 12
    runs = agent.log().count("tb-agent running")
    agent.start()
    wait_until(lambda: agent.log().count("tb-agent running") > runs, what="the last start")
    wait_until(lambda: set(ts) <= {t for t, _ in seq_points(server)}, timeout=30,
               what="every queued reading at the server")
    assert agent.stop() == 0
    assert "configuration reloaded" in agent.log()


# ---- the state directory ------------------------------------------------------------------------

def test_a_read_only_state_dir_is_reported_and_recovers(server, agents, tmp_path):
    script, state = counter_script(tmp_path)
    with scratch_mount(tmp_path / "ro", size="8m") as state_dir:
        agent = agents(config(server, script, state_dir=str(state_dir)))
        agent.start()
        wait_until(lambda: len(seq_points(server)) >= 3, what="first readings")
        assert agent.stop() == 0
        subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
        agent.start()  # a state dir that became read-only, e.g. a file system error
        agent.wait_log("cannot queue readings", timeout=20)
        assert agent.running(), "a read-only state dir must not end the agent"
        subprocess.run(["mount", "-o", "remount,rw", str(state_dir)], check=True)
        agent.wait_log("queueing readings works again", timeout=30)
        n = len(seq_points(server))
        wait_until(lambda: len(seq_points(server)) > n + 3, what="delivery after rw again")
        assert agent.stop() == 0


def test_a_vanishing_state_dir_is_recreated_and_nothing_queued_is_lost(server, agents,
                                                                         tmp_path):
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script))
    agent.start()
    wait_until(lambda: len(seq_points(server)) >= 3, what="first readings")
    server.check("drop-all on")  # readings queue up in the file about to vanish
    time.sleep(1)
    shutil.rmtree(agent.state_dir)
    agent.wait_log("state directory", timeout=20)
    wait_until(lambda: (agent.state_dir / "queue.db").exists(), timeout=20,
               what="the queue made anew")
    time.sleep(1)
    assert agent.running()
    assert agent.stop() == 0
    # Restarted on the new state dir, everything produced arrives.
    server.check("drop-all off")
    agent.start()
    all_arrive(server, agent)
    assert agent.stop() == 0


# ---- the clock ---------------------------------------------------------------------------------

def fakeclock_env(offset_file):
    lib = build_dir() / "tests" / "integration" / "fakeclock.so"
    assert lib.exists(), f"{lib} not built (target tb-fakeclock)"
    return {"LD_PRELOAD": str(lib), "TB_FAKECLOCK_FILE": str(offset_file)}


def set_offset(path, offset_ms):
    """Steps the agent's wall clock to the true time + offset_ms (fakeclock.c)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{int(offset_ms)}\n")
    tmp.rename(path)


def readings_between(agent, since):
    return len(queued_ts(agent)) - since


def test_clock_steps_of_hours_keep_timestamps_sane_and_max_age_keeps_good_data(
        server, agents, tmp_path):
    offset = tmp_path / "faketime"
    set_offset(offset, 0)
    script, state = counter_script(tmp_path)
    # max_age 30 s: the limits are checked every 3 s, so a reading that looked hours old after a
    # forward step would be dropped within the test.
    agent = agents(config(server, script, queue={"max_age": "30s"}))
    server.check("drop-all on")  # everything stays queued through the steps
    real_start = int(time.time() * 1000)
    agent.start(env=fakeclock_env(offset))
    wait_until(lambda: len(queued_ts(agent)) >= 10, what="readings before the steps")
    for step in (3 * HOUR_MS, -2 * HOUR_MS, 0):  # forward, back, back to the true time
        n = len(queued_ts(agent))
        set_offset(offset, step)
        # Timers are on CLOCK_BOOTTIME/MONOTONIC: the source keeps its pace through every step.
        wait_until(lambda: len(queued_ts(agent)) >= n + 15, timeout=15,
                   what=f"readings after the step to {step}")
        time.sleep(3.5)  # a limits check (every 3 s) after the step
    assert "the system clock was stepped by +3h;" in agent.log(), agent.log()[-2000:]
    server.check("drop-all off")
    n = all_arrive(server, agent)
    real_end = int(time.time() * 1000)
    assert agent.stop() == 0
    assert "queue limits reached" not in agent.log()
    got = sorted(seq_points(server), key=lambda p: p[1])
    # Re-stamped into the final (true) clock: inside the test's real time, in reading order.
    bad = [(ts, v) for ts, v in got if not real_start - 1000 <= ts <= real_end + 1000]
    assert not bad, f"{len(bad)} of {len(got)} readings stamped outside the test: {bad[:5]}"
    seqs = [v for _, v in got]
    assert seqs == sorted(seqs), "timestamps out of reading order"


def test_a_board_that_boots_in_1970_holds_readings_until_ntp_sets_the_clock(
        server, agents, tmp_path):
    offset = tmp_path / "faketime"
    now_s = int(time.time())
    set_offset(offset, -(now_s - 86400 * 60) * 1000)  # 1970-03-02 and running
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script))
    real_start = int(time.time() * 1000)
    agent.start(env=fakeclock_env(offset))
    wait_until(lambda: len(queued_ts(agent)) >= 15, what="readings while the clock is unset")
    assert min(queued_ts(agent)) < 86400 * 1000 * 365, "the agent did not see 1970"
    time.sleep(1)
    assert "the system clock is not set" in agent.log()
    assert seq_points(server) == [], "readings stamped 1970 were sent"
    set_offset(offset, 0)  # NTP steps the clock
    agent.wait_log("the system clock is set")
    n = all_arrive(server, agent)
    real_end = int(time.time() * 1000)
    assert agent.stop() == 0
    got = seq_points(server)
    bad = [(ts, v) for ts, v in got if not real_start - 1000 <= ts <= real_end + 1000]
    assert not bad, f"{len(bad)} of {len(got)} readings not re-stamped: {bad[:5]}"
