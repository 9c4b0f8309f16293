# ctest-labels: integration
"""A hostile server (issue 8): endless Block2 answers, a huge Size2, 2.31 Continues that end an
exchange. The real tb-agent against tb-test-server's hostile switches (docs/test-server.md)."""
import time

import pytest

from agent import build_dir, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET
from tbserver import TbServer
from test_spine import counter_script

TOKEN = "HOSTILETOKEN"
DEVICE = "hostile-1"
# 16 KiB (the default server.max_response_size) is 16 blocks of 1024 bytes: blocks 0..15 fit,
# block 16 is over the cap, and libcoap has asked for block 17 before the client sees block 16.
MAX_BLOCK_NUM = 17
# The agent peaks at ~7 MiB while draining (bench/); holding an endless answer made it 243 MB.
MAX_PEAK_RSS_KIB = 32 * 1024


@pytest.fixture
def server(tmp_path):
    srv = TbServer(build_dir(), tmp_path, devices={DEVICE: TOKEN},
                   provision_key=PROVISION_KEY, provision_secret=PROVISION_SECRET)
    srv.start()
    yield srv
    srv.stop()


def telemetry_config(server, script, request_timeout="30s", **delivery):
    d = {"flush_interval": "100ms", "backoff_initial": "300ms", "backoff_max": "1s",
         "shutdown_timeout": "2s"}
    d.update(delivery)
    return {
        # The default request_timeout: only the client's own limits may end a hostile exchange.
        "server": server_config(server, request_timeout=request_timeout),
        "device": {"name": DEVICE},
        "credentials": {"access_token": TOKEN},
        "sources": [{"name": "counter", "type": "exec", "command": [str(script)],
                     "interval": "100ms", "timeout": "100ms"}],
        "delivery": d,
    }


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


def seqs(server):
    return sorted({p[2] for p in server.points(DEVICE) if p[0] == "seq"})


def check_block_requests_bounded(server, switch):
    recs = server.hostile_records(switch)
    firsts = [r for r in recs if r.get("block2_num") == 0]
    later = [r for r in recs if r.get("block2_num", 0) > 0]
    assert firsts, "the switch never answered"
    assert max((r["block2_num"] for r in later), default=0) <= MAX_BLOCK_NUM, \
        f"{len(later)} block requests for {len(firsts)} answers"
    assert len(later) <= MAX_BLOCK_NUM * len(firsts)
    return firsts, later


def test_endless_block2_answer_is_capped_and_retried(server, agents, tmp_path):
    server.check("block2 endless")
    script, _ = counter_script(tmp_path)
    agent = agents(telemetry_config(server, script))
    agent.start()
    agent.wait_log("server's answer exceeds 16.0 KiB (Block2)", timeout=20)
    # Retried with backoff, each attempt abandoned at the cap long before request_timeout.
    wait_until(lambda: len([r for r in server.hostile_records("block2 endless")
                            if r.get("block2_num") == 0]) >= 3, timeout=20, what="3 attempts")
    time.sleep(2)
    assert agent.running()
    assert peak_rss_kib(agent.proc.pid) < MAX_PEAK_RSS_KIB
    firsts, _ = check_block_requests_bounded(server, "block2 endless")
    assert len(firsts) < 60, "attempts must back off"
    assert "retrying in" in agent.log()
    # The server behaves again: delivery goes on, nothing of the queue was lost.
    server.check("block2 off")
    n = len(server.records())
    wait_until(lambda: any(r.get("code") == "2.01" and "hostile" not in r
                           for r in server.records()[n:]), timeout=20, what="a plain 2.01")
    assert agent.stop() == 0
    got = seqs(server)
    assert got == list(range(1, got[-1] + 1))


def test_huge_size2_is_refused_at_once(server, agents, tmp_path):
    server.check("block2 huge-size2")
    script, _ = counter_script(tmp_path)
    agent = agents(telemetry_config(server, script))
    agent.start()
    agent.wait_log("(Size2), over the 16.0 KiB limit", timeout=20)
    wait_until(lambda: len(server.hostile_records("block2 huge-size2")) >= 4, timeout=20,
               what="a few attempts")
    assert peak_rss_kib(agent.proc.pid) < MAX_PEAK_RSS_KIB
    recs = server.hostile_records("block2 huge-size2")
    # libcoap asks for block 1 before the client sees block 0 and its Size2; nothing after it.
    assert max(r["block2_num"] for r in recs) <= 1
    firsts = [r for r in recs if r["block2_num"] == 0]
    assert len(recs) <= 2 * len(firsts)
    assert agent.stop() == 0


@pytest.mark.parametrize("mode", ["no-block1", "last-block", "wild-num", "szx7"])
def test_a_final_continue_keeps_the_readings(server, agents, tmp_path, mode):
    script, state = counter_script(tmp_path)
    agent = agents(telemetry_config(server, script, request_timeout="1s",
                                    max_batch_size="4KiB"))
    # Let readings pile up so the next batch needs Block1 (over 1024 bytes, ~60 per reading).
    server.check("drop-all on")
    agent.start()
    wait_until(lambda: state.exists() and int(state.read_text() or 0) >= 30, timeout=30,
               what="30 readings queued")
    server.check(f"continue {mode}")
    server.check("drop-all off")
    wait_until(lambda: sum(1 for r in server.hostile_records(f"continue {mode}")
                           if r["block1"]) >= 2, timeout=20, what="hostile 2.31 on Block1")
    agent.wait_log("server answered 2.31 Continue and no final answer", timeout=20)
    assert "retrying in" in agent.log()
    if mode != "last-block":
        # Nothing got through: every telemetry request was answered with the hostile 2.31.
        assert seqs(server) == []
    server.check("continue off")
    produced = int(state.read_text())
    wait_until(lambda: set(range(1, produced + 1)) <= set(seqs(server)), timeout=30,
               what="every reading queued during the hostile answers")
    assert agent.stop() == 0
    got = seqs(server)
    assert got == list(range(1, got[-1] + 1)), "a reading was deleted after a 2.31"


def test_provisioning_against_an_endless_block2_retries_and_stores_the_real_token(
        server, agents, tmp_path):
    server.check("block2 endless")
    script, _ = counter_script(tmp_path)
    cfg = telemetry_config(server, script)
    del cfg["credentials"]
    cfg["device"] = {"name": "prov-hostile"}
    cfg["provisioning"] = {"key": PROVISION_KEY, "secret": PROVISION_SECRET}
    agent = agents(cfg)
    start = time.monotonic()
    agent.start()
    agent.wait_log("server's answer exceeds 16.0 KiB (Block2)", timeout=20)
    assert agent.credentials() is None, "stored credentials from a capped answer"
    # The retry gets FAILURE (the first request did create the device); the agent then finds its
    # proposed token registered (thingsboard-coap-api.md §4.3) well before request_timeout (30 s).
    wait_until(lambda: agent.credentials(), timeout=25, what="credentials")
    assert time.monotonic() - start < 25
    assert agent.credentials()["credentialsValue"] == server.devices()["prov-hostile"]
    assert "provisioning: retrying" in agent.log()
    assert peak_rss_kib(agent.proc.pid) < MAX_PEAK_RSS_KIB
    check_block_requests_bounded(server, "block2 endless")
    assert agent.stop() == 0
