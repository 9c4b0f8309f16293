# ctest-labels: integration
"""tb-test-server's observations and server-side RPC with ThingsBoard's rules
(docs/thingsboard-coap.md §2.3, §3.1, §7; docs/test-server.md "Observe and RPC"), checked on the
wire with a raw CoAP endpoint that ACKs only when the test says so."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tbserver import TbServer  # noqa: E402
from test_tbserver import (ACK, CON, GET, OBSERVE, POST, Raw, code_str,  # noqa: E402
                           opt_uint)

BUILD_DIR = os.environ.get("TB_BUILD_DIR", str(Path(__file__).resolve().parents[2] / "build"))


@pytest.fixture
def server(tmp_path):
    srv = TbServer(BUILD_DIR, tmp_path, devices={"dev1": "tok1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def raw(server):
    r = Raw(server.port)
    yield r
    r.close()


def next_for(raw, token, timeout=3.0):
    """The next message carrying `token` (skipping empty ACKs), or None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        m = raw.recv(left)
        if m is None:
            return None
        if m["token"] == token:
            return m
    return None


def register(raw, feature):
    """GET Observe=0 (CON); returns the token and the first answer (ACKed if CON)."""
    _, tok = raw.request(GET, f"/api/v1/tok1/{feature}", options=[(OBSERVE, b"")])
    first = next_for(raw, tok)
    assert first is not None
    if first["type"] == CON:
        raw.ack(first)
    return tok, first


def test_rpc_is_delivered_on_ack_and_successful_on_reply(raw, server):
    tok, first = register(raw, "rpc")
    assert code_str(first["code"]) == "2.03" and opt_uint(first, OBSERVE) == 0
    rpc_id = server.send_rpc("dev1", "getStatus", 10000, {"a": 1})
    assert rpc_id == 0
    n = next_for(raw, tok)
    assert n["type"] == CON and opt_uint(n, OBSERVE) == 1
    assert json.loads(n["payload"]) == {"id": 0, "method": "getStatus", "params": {"a": 1}}
    assert server.rpcs("dev1")[0]["state"] == "SENT"
    raw.ack(n)
    server.wait_for(lambda: server.rpcs("dev1")[0]["state"] == "DELIVERED")
    reply = raw.call(POST, "/api/v1/tok1/rpc/0", b'{"ok":true}')
    assert code_str(reply["code"]) == "2.01"
    r = server.rpcs("dev1")[0]
    assert (r["state"], r["response"]) == ("SUCCESSFUL", {"ok": True})
    # A second reply to a finished id is still 2.01, and ignored (§3.1).
    assert code_str(raw.call(POST, "/api/v1/tok1/rpc/0", b'{"ok":false}')["code"]) == "2.01"
    assert server.rpcs("dev1")[0]["response"] == {"ok": True}
    assert server.stats()["rpc_replies_ignored"] == 1


def test_unacked_rpc_times_out_then_expires(raw, server):
    tok, _ = register(raw, "rpc")
    server.send_rpc("dev1", "slow", 12000)
    assert next_for(raw, tok) is not None  # never ACKed
    # §3.1: no ACK within min(10 s, time to expiry) -> TIMEOUT; then EXPIRED at 12 s.
    server.wait_for(lambda: server.rpcs("dev1")[0]["state"] == "TIMEOUT", timeout=15)
    server.wait_for(lambda: server.rpcs("dev1")[0]["state"] == "EXPIRED", timeout=10)
    # A reply after expiry is acknowledged and ignored.
    assert code_str(raw.call(POST, "/api/v1/tok1/rpc/0", b'{}')["code"]) == "2.01"
    assert server.rpcs("dev1")[0]["state"] == "EXPIRED"


def test_pending_rpc_is_sent_on_registration_and_again_on_reregistration(raw, server):
    server.send_rpc("dev1", "reboot", 30000)
    assert server.rpcs("dev1")[0]["state"] == "QUEUED"  # nobody observes yet
    tok1, _ = register(raw, "rpc")
    n = next_for(raw, tok1)
    assert json.loads(n["payload"])["method"] == "reboot"
    raw.ack(n)
    # Not answered: a newer registration ends the older with 2.02 and gets the RPC again.
    _, tok2 = raw.request(GET, "/api/v1/tok1/rpc", options=[(OBSERVE, b"")])
    seen = {}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(seen) < 3:
        m = raw.recv(1.0)
        if m is None or (m["type"] == ACK and m["code"] == 0):
            continue
        if m["type"] == CON:
            raw.ack(m)
        key = ("old" if m["token"] == tok1 else "new") + code_str(m["code"])
        seen[key] = m
    assert "old2.02" in seen and opt_uint(seen["old2.02"], OBSERVE) == 1
    assert "new2.03" in seen
    assert json.loads(seen["new2.05"]["payload"]) == {"id": 0, "method": "reboot", "params": None}


def test_ids_restart_from_zero_after_actor_restart(raw, server):
    register(raw, "rpc")
    assert [server.send_rpc("dev1", m, 30000) for m in ("a", "b")] == [0, 1]
    server.check("actor-restart dev1")
    assert [r["state"] for r in server.rpcs("dev1")] == ["EXPIRED", "EXPIRED"]
    assert server.send_rpc("dev1", "c", 30000) == 0


def test_notifications_coalesce_while_unacked(raw, server):
    tok, _ = register(raw, "attributes")
    server.check('set-shared dev1 {"v":1}')
    first = next_for(raw, tok)
    assert json.loads(first["payload"]) == {"v": 1}
    # Not ACKed: the next two are not queued, only the freshest is kept (Californium).
    server.check('set-shared dev1 {"v":2}')
    server.check('set-shared dev1 {"v":3}')
    m = next_for(raw, tok, timeout=1.0)
    assert m is None or m["mid"] == first["mid"]  # at most a retransmission of the first
    raw.ack(first)
    n = next_for(raw, tok)
    assert json.loads(n["payload"]) == {"v": 3}
    raw.ack(n)
    assert next_for(raw, tok, timeout=1.0) is None
    assert server.stats()["notifications_coalesced"] == 1


def test_deleted_shared_attributes_are_notified(raw, server):
    server.check('set-shared dev1 {"a":1,"b":2}')
    tok, first = register(raw, "attributes")
    assert json.loads(first["payload"]) == {"a": 1, "b": 2}
    server.check("delete-shared dev1 a b")
    n = next_for(raw, tok)
    assert json.loads(n["payload"]) == {"deleted": ["a", "b"]}
    raw.ack(n)
    assert server.attributes("dev1")["shared"] == {}


def test_rst_cancels_and_end_observe_sends_deleted(raw, server):
    tok, _ = register(raw, "attributes")
    server.check('set-shared dev1 {"v":1}')
    n = next_for(raw, tok)
    raw.send(bytes([0x70, 0, n["mid"] >> 8, n["mid"] & 0xFF]))  # RST
    server.wait_for(lambda: server.observers("dev1")["attributes"] is None)
    tok, _ = register(raw, "rpc")
    server.check("end-observe dev1 rpc")
    m = next_for(raw, tok)
    assert code_str(m["code"]) == "2.02"
    assert server.observers("dev1")["rpc"] is None
