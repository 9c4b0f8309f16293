# ctest-labels: integration serverfault
"""Server faults (issue 14 item 2): what ThingsBoard, or the path to it, does when things go
wrong — 5.00 storms, answers that never come, come late, twice, out of order, with the wrong
token, cut short or too big, Block1 broken off or refused, the device deleted, provisioning
answers lost, late or malformed. The real tb-agent against tb-test-server's switches
(docs/test-server.md "Faults"); each fault is handled as docs/thingsboard-coap.md recommends.
docs/testing.md "Fault suites" maps every fault to its test."""
import time

import pytest

from agent import build_dir, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET, registered_server
from test_durability import QUEUED
from test_spine import counter_script

TOKEN = "FAULTTOKEN"
DEVICE = "fault-1"


@pytest.fixture
def server(tmp_path):
    srv = registered_server(tmp_path, DEVICE, TOKEN)
    yield srv
    srv.stop()


def config(server, script, request_timeout="1s", interval="100ms", **delivery):
    d = {"flush_interval": "100ms", "backoff_initial": "100ms", "backoff_max": "1s",
         "shutdown_timeout": "2s"}
    d.update(delivery)
    return {
        "server": server_config(server, request_timeout=request_timeout),
        "device": {"name": DEVICE},
        "credentials": {"access_token": TOKEN},
        "sources": [{"name": "counter", "type": "exec", "command": [str(script)],
                     "interval": interval, "timeout": interval}],
        "delivery": d,
    }


def seq_points(server, device=DEVICE):
    return [(p[1], p[2]) for p in server.points(device) if p[0] == "seq"]


def telemetry(server):
    return [r for r in server.records() if r.get("feature") == "telemetry"]


def fault_records(server, mode):
    return [r for r in server.records() if r.get("fault") == mode]


def produced(state):
    return int(state.read_text() or 0) if state.exists() else 0


def queued_records(agent):
    """Records the agent made durable (one debug line each). The counter's own count can run
    ahead: a run killed by the source timeout counted but printed nothing."""
    return len(QUEUED.findall(agent.log()))


def drain_and_check(agent, server, state, exactly_once=False, timeout=30):
    """Every reading queued arrives; a reading sent twice (at-least-once, docs/queue.md) keeps
    its timestamp, so ThingsBoard stores it once."""
    n = queued_records(agent)
    wait_until(lambda: len({v for _, v in seq_points(server)}) >= n, timeout=timeout,
               what=f"the {n} queued readings at the server")
    assert agent.stop() == 0, agent.log()[-3000:]
    by_seq = {}
    for ts, v in seq_points(server):
        by_seq.setdefault(v, set()).add(ts)
    assert len(by_seq) >= queued_records(agent), "a queued reading never arrived"
    assert all(len(ts) == 1 for ts in by_seq.values()), "a resent reading changed its ts"
    if exactly_once:
        assert len(seq_points(server)) == len(by_seq), "a reading was stored twice"


def test_a_500_storm_is_paced_by_backoff_and_loses_nothing(server, agents, tmp_path):
    # §1: 5.00 is ThingsBoard's rate-limit answer: retry with capped, jittered backoff.
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script, backoff_initial="200ms", backoff_max="1s"))
    agent.start()
    wait_until(lambda: seq_points(server), what="first readings")
    server.check("fail-all 5.00")
    before = len(telemetry(server))
    time.sleep(6)
    storm = len(telemetry(server)) - before
    server.check("fail-all off")
    # At most ~1 request per backoff_max after the first few; never one per reading (60 here).
    assert 3 <= storm <= 25, f"{storm} requests in 6 s of 5.00"
    assert agent.running()
    drain_and_check(agent, server, state)


def test_answers_that_never_come_are_timed_out_and_retried(server, agents, tmp_path):
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script))
    agent.start()
    wait_until(lambda: seq_points(server), what="first readings")
    server.check("drop-all on")
    time.sleep(3.5)
    assert "no response within 1000 ms" in agent.log()
    server.check("drop-all off")
    drain_and_check(agent, server, state)


def test_a_slow_separate_answer_within_request_timeout_is_the_answer(server, agents, tmp_path):
    # §6.4/§8: over 500 ms the server empty-ACKs and answers later as a separate CON.
    script, state = counter_script(tmp_path, name="slow")
    agent = agents(config(server, script, request_timeout="5s", interval="300ms"))
    server.check("delay 1500")
    agent.start()
    wait_until(lambda: len([r for r in telemetry(server) if r.get("reply") == "separate"]) >= 3,
               timeout=20, what="three slow separate answers")
    server.check("delay 0")
    assert "no response within" not in agent.log()
    drain_and_check(agent, server, state, exactly_once=True)


def test_an_answer_later_than_request_timeout_is_ignored_and_the_batch_resent(
        server, agents, tmp_path):
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script, request_timeout="1s"))
    server.check("delay 2500")
    agent.start()
    wait_until(lambda: len(telemetry(server)) >= 3, timeout=20, what="three late answers")
    server.check("delay 0")
    assert "no response within 1000 ms" in agent.log()
    drain_and_check(agent, server, state)


@pytest.mark.parametrize("mode,exactly_once", [
    ("ack-only", False),     # processed, answer never comes: resent (at-least-once)
    ("duplicate", True),     # the second copy must not confirm anything else
    ("reorder", False),      # the held answer comes after the next one, with an old token
    ("wrong-token", False),  # no request of ours: no answer (RFC 7252 §5.3.2)
    ("truncate", False),     # telemetry answers have no payload: a malformed datagram
    ("oversize", False),     # a 4096-byte answer
])
def test_a_mangled_telemetry_answer_loses_nothing(server, agents, tmp_path, mode, exactly_once):
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script))
    agent.start()
    wait_until(lambda: seq_points(server), what="first readings")
    server.check(f"fault {mode} 4")
    wait_until(lambda: len(fault_records(server, mode)) >= 4, timeout=30,
               what=f"four answers shaped by 'fault {mode}'")
    assert agent.running(), agent.log()[-3000:]
    drain_and_check(agent, server, state, exactly_once=exactly_once)


def backlog_config(server, script):
    # Readings pile up so that a batch needs Block1 (over 1024 bytes, ~60 bytes per reading).
    return config(server, script, max_batch_size="4KiB")


def pile_up(agent, server, state, n=40):
    server.check("drop-all on")
    agent.start()
    wait_until(lambda: produced(state) >= n, timeout=30, what=f"{n} readings queued")


def test_block1_broken_off_with_408_is_restarted_from_block_0(server, agents, tmp_path):
    # §1 and the recommendations: 4.08 means the transfer broke; start again at block 0.
    script, state = counter_script(tmp_path)
    agent = agents(backlog_config(server, script))
    pile_up(agent, server, state)
    server.check("fault block1-abort 2")
    server.check("drop-all off")
    wait_until(lambda: len(fault_records(server, "block1-abort")) >= 2, timeout=20,
               what="two Block1 transfers broken off")
    drain_and_check(agent, server, state)
    assert any(r["block1"] and r.get("block_num") == 0 and r["code"] == "2.31"
               for r in server.records()), "the retry starts at block 0"


def test_block1_refused_with_413_sends_smaller_bodies(server, agents, tmp_path):
    # §1 and the recommendations: 4.13 means "reduce the body". Here every Block1 transfer is
    # refused; the readings must still arrive, in requests that need no Block1.
    script, state = counter_script(tmp_path)
    agent = agents(backlog_config(server, script))
    pile_up(agent, server, state)
    server.check("fault block1-refuse")
    server.check("drop-all off")
    drain_and_check(agent, server, state)
    assert fault_records(server, "block1-refuse"), "no Block1 transfer was refused"


def test_a_deleted_device_stops_sending_keeps_readings_and_resumes_when_restored(
        server, agents, tmp_path):
    # §7: device deleted -> 4.01 for its token. Not retryable as is: stop, keep the data, probe
    # rarely; an operator restores the device (same token) and everything queued arrives.
    script, state = counter_script(tmp_path)
    agent = agents(config(server, script, backoff_max="2s"))
    agent.start()
    wait_until(lambda: seq_points(server), what="first readings")
    server.check(f"delete {DEVICE}")
    assert DEVICE not in server.devices()
    agent.wait_log("server rejected the access token (4.01)")
    n = len(telemetry(server))
    time.sleep(1.5)
    assert len(telemetry(server)) <= n + 1, "sending goes on after 4.01"
    server.stop()
    server.options["devices"] = {DEVICE: TOKEN}
    server.start()
    drain_and_check(agent, server, state, timeout=40)


# ---- provisioning answers lost, late or malformed ----------------------------------------------

def provisioning_config(server, name, request_timeout="1s"):
    temp = server.dir / f"{name}.value"
    temp.write_text("1\n")
    return {
        "server": server_config(server, request_timeout=request_timeout),
        "device": {"name": name},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "v", "type": "file", "path": str(temp), "key": "x",
                     "interval": "300ms"}],
        "delivery": {"flush_interval": "100ms", "backoff_initial": "200ms", "backoff_max": "1s",
                     "shutdown_timeout": "2s"},
    }


def check_provisioned_once(agent, server, name):
    creds = wait_until(agent.credentials, timeout=30, what="credentials")
    assert creds["credentialsValue"] == server.devices()[name]
    created = [r for r in server.records()
               if r.get("provision_status") == "SUCCESS" and r.get("provision_name") == name]
    assert len(created) == 1, "provisioned more than once"
    wait_until(lambda: [p for p in server.points(name) if p[0] == "x"], timeout=20,
               what="telemetry with the provisioned token")
    assert PROVISION_SECRET not in agent.log()
    assert agent.stop() == 0


@pytest.mark.parametrize("mode", ["ack-only", "duplicate", "reorder", "wrong-token", "truncate",
                                  "oversize"])
def test_a_mangled_provisioning_answer_provisions_once(server, agents, tmp_path, mode):
    # §4.3: the device is created by the first request; a retry gets FAILURE; the agent then finds
    # its proposed token registered. The credentials file is written once, whole.
    name = f"prov-{mode}"
    agent = agents(provisioning_config(server, name))
    server.check(f"fault {mode} 1")
    agent.start()
    check_provisioned_once(agent, server, name)
    assert fault_records(server, mode)


def test_a_late_provisioning_answer_is_recovered(server, agents, tmp_path):
    name = "prov-late"
    agent = agents(provisioning_config(server, name))
    server.check("delay 2500")  # later than request_timeout (1 s)
    agent.start()
    wait_until(lambda: [r for r in server.records() if r.get("feature") == "provision"],
               what="the first provisioning request")
    server.check("delay 0")
    check_provisioned_once(agent, server, name)


def test_a_500_to_provisioning_is_retried(server, agents, tmp_path):
    # Recommendations "Provisioning" 5: on 5.00 retry with backoff. tb-test-server's `fail`
    # covers only telemetry and attributes, so the answer is lost instead: the device is not
    # created by a dropped request.
    name = "prov-drop"
    agent = agents(provisioning_config(server, name))
    server.check("drop 3")
    agent.start()
    check_provisioned_once(agent, server, name)


# ---- the switches on the wire (raw CoAP: what tb-test-server sends is checked directly) -------

def test_fault_switches_on_the_wire(server):
    import socket
    from test_tbserver import ACK, BLOCK1, CON, POST, Raw, code_str, uint_opt
    raw = Raw(server.port)
    path = f"/api/v1/{TOKEN}/telemetry"

    def datagrams(window=1.0):
        out, end = [], time.monotonic() + window
        while (left := end - time.monotonic()) > 0:
            raw.sock.settimeout(left)
            try:
                out.append(raw.sock.recvfrom(65536)[0])
            except socket.timeout:
                break
        return out

    try:
        from test_tbserver import decode
        server.check("fault ack-only 1")
        mid, _ = raw.request(POST, path, b'{"a":1}')
        got = [decode(d) for d in datagrams()]
        assert [(m["type"], m["code"], m["mid"]) for m in got] == [(ACK, 0, mid)]
        assert len(server.points(DEVICE)) == 1  # processed all the same

        server.check("fault duplicate 1")
        _, token = raw.request(POST, path, b'{"a":2}')
        got = [decode(d) for d in datagrams()]
        answers = [m for m in got if m["type"] == CON and m["token"] == token]
        assert len(answers) == 2 and answers[0]["mid"] != answers[1]["mid"]
        for m in answers:
            raw.ack(m)

        server.check("fault wrong-token 1")
        _, token = raw.request(POST, path, b'{"a":3}')
        got = [decode(d) for d in datagrams()]
        assert got and all(m["token"] != token for m in got)
        for m in got:
            raw.ack(m)

        server.check("fault truncate 1")
        raw.request(POST, path, b'{"a":4}')
        assert [len(d) for d in datagrams()] == [4 + 4 - 1]  # header + token, cut by one byte

        server.check("fault oversize 1")
        raw.request(POST, path, b'{"a":5}')
        assert [len(d) for d in datagrams()] == [4096]

        server.check("fault reorder 1")
        _, held = raw.request(POST, path, b'{"a":6}')
        assert datagrams(0.7) == []
        _, token = raw.request(POST, path, b'{"a":7}')
        got = [decode(d) for d in datagrams()]
        assert [m["token"] for m in got if m["code"]] == [token, held]  # the held one after
        for m in got:
            if m["type"] == CON:
                raw.ack(m)

        body = b'{"blob":"' + b"y" * 1500 + b'"}'
        server.check("fault block1-refuse 1")
        raw.request(POST, path, body[:1024], options=[(BLOCK1, uint_opt(0x8 | 6))])
        assert code_str(raw.recv()["code"]) == "4.13"
        server.check("fault block1-abort 1")
        raw.request(POST, path, body[:1024], options=[(BLOCK1, uint_opt(0x8 | 6))])
        assert code_str(raw.recv()["code"]) == "2.31"
        raw.request(POST, path, body[1024:], options=[(BLOCK1, uint_opt(1 << 4 | 6))])
        assert code_str(raw.recv()["code"]) == "4.08"

        assert server.stats()["fault_answers"] == 8
        assert server.command("fault sometimes").startswith("error usage")
        server.check(f"delete {DEVICE}")
        assert DEVICE not in server.devices()
        raw.request(POST, path, b'{"a":8}')
        assert code_str(raw.recv()["code"]) == "4.01"
        assert server.command(f"delete {DEVICE}") == "error unknown device"
    finally:
        raw.close()
