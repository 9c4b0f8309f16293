# ctest-labels: integration
"""Tests of tb-test-server itself: it must be at least as strict as ThingsBoard
(docs/thingsboard-coap.md). Uses libcoap's coap-client where it can express the
request, and a raw-socket CoAP encoder (below) where framing on the wire must be checked."""

import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tbserver import TbServer  # noqa: E402

BUILD_DIR = os.environ.get("TB_BUILD_DIR", str(Path(__file__).resolve().parents[2] / "build"))
COAP_CLIENT = next((shutil.which(n) for n in ("coap-client", "coap-client-notls",
                                               "coap-client-openssl", "coap-client-gnutls")
                    if shutil.which(n)), None)

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST, PUT, DELETE = 1, 2, 3, 4
OBSERVE, URI_PATH, CONTENT_FORMAT, URI_QUERY, BLOCK1 = 6, 11, 12, 15, 27


# ---- raw CoAP ---------------------------------------------------------------------------------
def _ext(v):
    if v < 13:
        return v, b""
    if v < 269:
        return 13, bytes([v - 13])
    return 14, struct.pack("!H", v - 269)


def uint_opt(v):
    out = b""
    while v:
        out = bytes([v & 0xFF]) + out
        v >>= 8
    return out


def encode(mtype, code, mid, token=b"", options=(), payload=b""):
    out = bytes([0x40 | (mtype << 4) | len(token), code]) + struct.pack("!H", mid) + token
    last = 0
    for num, val in sorted(options, key=lambda o: o[0]):
        d, dx = _ext(num - last)
        ln, lx = _ext(len(val))
        out += bytes([(d << 4) | ln]) + dx + lx + val
        last = num
    if payload:
        out += b"\xff" + payload
    return out


def decode(data):
    tkl = data[0] & 0x0F
    msg = dict(type=(data[0] >> 4) & 3, code=data[1], mid=struct.unpack("!H", data[2:4])[0],
               token=data[4:4 + tkl], options=[], payload=b"")
    i, num = 4 + tkl, 0
    while i < len(data):
        if data[i] == 0xFF:
            msg["payload"] = data[i + 1:]
            break
        d, ln = data[i] >> 4, data[i] & 0x0F
        i += 1
        vals = []
        for n in (d, ln):
            if n == 13:
                vals.append(data[i] + 13)
                i += 1
            elif n == 14:
                vals.append(struct.unpack("!H", data[i:i + 2])[0] + 269)
                i += 2
            else:
                vals.append(n)
        num += vals[0]
        msg["options"].append((num, data[i:i + vals[1]]))
        i += vals[1]
    return msg


def code_str(c):
    return f"{c >> 5}.{c & 31:02d}"


def opt_uint(msg, num):
    for n, v in msg["options"]:
        if n == num:
            return int.from_bytes(v, "big")
    return None


def path_opts(path):
    path, _, query = path.partition("?")
    opts = [(URI_PATH, s.encode()) for s in path.strip("/").split("/") if s]
    opts += [(URI_QUERY, q.encode()) for q in query.split("&") if q]
    return opts


class Raw:
    """A CoAP endpoint on a raw UDP socket; nothing is ACKed unless the test does it."""

    def __init__(self, port):
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.mid = random.randint(0, 60000)

    def close(self):
        self.sock.close()

    def next_mid(self):
        self.mid = (self.mid + 1) & 0xFFFF
        return self.mid

    def send(self, data):
        self.sock.sendto(data, self.addr)

    def request(self, method, path, payload=b"", mtype=CON, token=None, options=(), mid=None):
        mid = self.next_mid() if mid is None else mid
        token = os.urandom(4) if token is None else token
        opts = path_opts(path) + list(options)
        self.send(encode(mtype, method, mid, token, opts, payload))
        return mid, token

    def recv(self, timeout=2.0):
        self.sock.settimeout(timeout)
        try:
            data, _ = self.sock.recvfrom(65536)
        except socket.timeout:
            return None
        return decode(data)

    def recv_all(self, window=1.0):
        out, deadline = [], time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            m = self.recv(left)
            if m is None:
                break
            out.append(m)
        return out

    def ack(self, msg):
        self.send(encode(ACK, 0, msg["mid"]))

    def call(self, method, path, payload=b"", **kw):
        """Request and return the final response, ACKing a CON response like a client must."""
        mid, token = self.request(method, path, payload, **kw)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            m = self.recv(deadline - time.monotonic())
            if m is None:
                break
            if m["type"] == ACK and m["code"] == 0 and m["mid"] == mid:
                continue  # empty ACK: the answer comes separately
            if m["token"] != token:
                continue
            if m["type"] == CON:
                self.ack(m)
            return m
        raise AssertionError(f"no response to {path}")


def telemetry_path(tok):
    return f"/api/v1/{tok}/telemetry"


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    srv = TbServer(BUILD_DIR, tmp_path, provision_key="pk", provision_secret="ps",
                   devices={"dev1": "tok1", "dev2": "tok2"})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def raw(server):
    r = Raw(server.port)
    yield r
    r.close()


def coap_client(port, method, path, payload=None, extra=(), timeout=20):
    assert COAP_CLIENT, "libcoap3-bin (coap-client) is not installed"
    argv = [COAP_CLIENT, "-m", method, "-B", "5"] + list(extra)
    if payload is not None:
        argv += ["-e", payload]
    argv.append(f"coap://127.0.0.1:{port}{path}")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


# ---- §0 resource tree, parsing, methods, auth --------------------------------------------------
@pytest.mark.parametrize("method,path,payload,expected", [
    (POST, "/api/v1/tok1/telemetry", b'{"a":1}', "2.01"),
    (POST, "/api/v1/tok1/TeLeMeTrY", b'{"a":1}', "2.01"),        # case-insensitive feature
    (POST, "/api/v1/tok1/telemetry/77", b'{"a":1}', "2.01"),     # 5 segments: id ignored
    (POST, "/api/v1/tok1/bogus", b'{"a":1}', "4.00"),            # unknown feature
    (POST, "/api/v1/tok1", b'{"a":1}', "4.00"),                  # 3 segs: "tok1" is no feature
    (POST, "/api/v1", b'{"a":1}', "4.00"),                       # missing feature
    (POST, "/api/v1/telemetry", b'{"a":1}', "4.01"),             # X.509 form, no identity
    (POST, "/api/v1/telemetry/12", b'{"a":1}', "4.01"),          # 4 segs, digits: X.509 form
    (POST, "/api/v1/nosuchtoken/telemetry", b'{"a":1}', "4.01"),
    (POST, "/api/v2/tok1/telemetry", b'{"a":1}', "4.04"),
    (POST, "/foo/bar", b'{"a":1}', "4.04"),
    (POST, "/api", b'{"a":1}', "4.05"),
    (PUT, "/api/v1/tok1/telemetry", b'{"a":1}', "4.05"),
    (DELETE, "/api/v1/tok1/telemetry", b"", "4.05"),
    (7, "/api/v1/tok1/attributes", b"{}", "4.05"),              # iPATCH
    (GET, "/api/v1/tok1/telemetry", b"", "4.00"),
    (GET, "/api/v1/nosuchtoken/telemetry", b"", "4.00"),         # feature check before auth
    (GET, "/api/v1/tok1/rpc", b"", "4.00"),
    (GET, "/api/v1/tok1/claim", b"", "4.00"),
    (GET, "/api/v1/tok1/provision", b"", "4.00"),
    (GET, "/api/v1/nosuchtoken/attributes", b"", "4.01"),
    (POST, "/api/v1/tok1/attributes", b'{"fw":"v1"}', "2.01"),
    (POST, "/api/v1/tok1/attributes", b'[{"fw":"v1"}]', "4.00"),
    (POST, "/api/v1/tok1/claim", b"", "2.01"),
    (POST, "/api/v1/tok1/claim", b"[1]", "4.00"),
    (POST, "/api/v1/tok1/rpc/5", b'{"result":"ok"}', "2.01"),
    (POST, "/api/v1/tok1/rpc/5", b"[1]", "5.00"),
    (GET, "/fw/tok1", b"", "4.04"),                               # no OTA package assigned
    (GET, "/fw/nosuchtoken", b"", "4.01"),
    (POST, "/fw/tok1", b"", "4.05"),
])
def test_response_codes(raw, method, path, payload, expected):
    assert code_str(raw.call(method, path, payload)["code"]) == expected


def test_single_uri_path_option_with_slashes_is_split(raw, server):
    mid, tok = raw.next_mid(), b"\x01\x02"
    raw.send(encode(CON, POST, mid, tok, [(URI_PATH, b"api/v1/tok1/telemetry")], b'{"k":3}'))
    m = raw.recv()
    assert code_str(m["code"]) == "2.01" and m["token"] == tok
    assert [p.value for p in server.points("dev1")] == [3]


def test_errors_have_empty_payload_and_are_piggybacked(raw):
    mid, tok = raw.request(POST, "/api/v1/wrong/telemetry", b'{"a":1}')
    m = raw.recv()
    assert (m["type"], m["mid"], m["token"], code_str(m["code"])) == (ACK, mid, tok, "4.01")
    assert m["payload"] == b"" and m["options"] == []


def test_coap_client_sees_codes(server):
    ok = coap_client(server.port, "post", telemetry_path("tok1"), '{"temp":21.5}')
    assert ok.returncode == 0 and not re.search(r"\b[45]\.\d\d\b", ok.stdout + ok.stderr)
    bad = coap_client(server.port, "post", telemetry_path("nope"), '{"temp":21.5}')
    assert "4.01" in bad.stdout + bad.stderr
    get = coap_client(server.port, "get", telemetry_path("tok1"))
    assert "4.00" in get.stdout + get.stderr
    put = coap_client(server.port, "put", telemetry_path("tok1"), "{}")
    assert "4.05" in put.stdout + put.stderr
    assert [p.value for p in server.points("dev1")] == [21.5]


# ---- §1 telemetry validation and typing --------------------------------------------------------
@pytest.mark.parametrize("payload,expected", [
    (b"", "4.00"),
    (b"{", "4.00"),
    (b"not json", "4.00"),
    (b"42", "4.00"),
    (b'"str"', "4.00"),
    (b"[1,2]", "4.00"),
    (b'[{"a":1}, 5]', "4.00"),
    (b'{"ts":1700000000000,"values":5}', "4.00"),
    (b'{"ts":1700000000000,"values":[1]}', "4.00"),
    (b'{"ts":"abc","values":{"a":1}}', "5.00"),
    (b'{"ts":null,"values":{"a":1}}', "5.00"),
    (b"{}", "2.01"),
    (b"[]", "2.01"),
])
def test_telemetry_validation(raw, server, payload, expected):
    assert code_str(raw.call(POST, telemetry_path("tok1"), payload)["code"]) == expected
    if expected != "2.01":
        assert server.points() == []


def test_telemetry_shapes_and_typing(raw, server):
    before = int(time.time() * 1000)
    assert code_str(raw.call(POST, telemetry_path("tok1"),
                             b'{"a":1,"b":2.5,"on":true,"s":"0042","x":"hi","n":null,'
                             b'"o":{"in":1}}')["code"]) == "2.01"
    after = int(time.time() * 1000)
    pts = {p.key: p for p in server.points("dev1")}
    assert set(pts) == {"a", "b", "on", "s", "x", "o"}  # null skipped
    assert pts["s"].value == 42 and pts["x"].value == "hi" and pts["on"].value is True
    assert pts["o"].value == {"in": 1}
    assert all(before <= p.ts <= after for p in pts.values())  # server time for flat objects

    raw.call(POST, telemetry_path("tok2"),
             b'[{"ts":1700000000000,"values":{"t":1}},{"ts":"1700000001000","values":{"t":2}},'
             b'{"u":3},{"ts":5}]')
    got = [(p.key, p.ts, p.value) for p in server.points("dev2")]
    assert got[:2] == [("t", 1700000000000, 1), ("t", 1700000001000, 2)]
    assert [k for k, _, _ in got[2:]] == ["u", "ts"]  # only "ts" without "values": flat
    rec = [r for r in server.records() if r.get("device") == "dev2"][-1]
    assert rec["points"][0] == ["t", 1700000000000, 1] and rec["code"] == "2.01"


def test_success_is_201_without_payload_or_content_format(raw):
    m = raw.call(POST, telemetry_path("tok1"), b'{"a":1}')
    assert code_str(m["code"]) == "2.01" and m["payload"] == b"" and m["options"] == []


# ---- §2 attributes ----------------------------------------------------------------------------
def test_attributes_publish_and_get(raw, server):
    assert code_str(raw.call(POST, "/api/v1/tok1/attributes", b'{"fw":"v1","n":"7"}')["code"]) == "2.01"
    server.check('set-shared dev1 {"target":"v2"}')
    m = raw.call(GET, "/api/v1/tok1/attributes?clientKeys=fw,n&sharedKeys=target")
    assert code_str(m["code"]) == "2.05" and opt_uint(m, CONTENT_FORMAT) == 50
    assert json.loads(m["payload"]) == {"client": {"fw": "v1", "n": 7}, "shared": {"target": "v2"}}
    m = raw.call(GET, "/api/v1/tok1/attributes?sharedKeys=target")
    assert json.loads(m["payload"]) == {"shared": {"target": "v2"}}
    m = raw.call(GET, "/api/v1/tok1/attributes")  # neither list: everything
    assert json.loads(m["payload"]) == {"client": {"fw": "v1", "n": 7}, "shared": {"target": "v2"}}
    m = raw.call(GET, "/api/v1/tok1/attributes?clientKeys=nope")
    assert code_str(m["code"]) == "4.04"
    m = raw.call(GET, "/api/v1/tok2/attributes")
    assert code_str(m["code"]) == "4.04"


def test_attribute_observe_first_response_and_notification(raw, server):
    mid, tok = raw.request(GET, "/api/v1/tok1/attributes", options=[(OBSERVE, b"")])
    m = raw.recv()
    assert (m["type"], m["mid"], code_str(m["code"])) == (ACK, mid, "2.05")
    assert opt_uint(m, OBSERVE) == 0 and json.loads(m["payload"]) == {}
    server.check('set-shared dev1 {"fw_version":"1.2"}')
    n = raw.recv()
    assert n["type"] == CON and n["token"] == tok and opt_uint(n, OBSERVE) == 1
    assert json.loads(n["payload"]) == {"fw_version": "1.2"}
    raw.ack(n)


# ---- §8 framing --------------------------------------------------------------------------------
def test_default_framing_is_con_without_empty_ack(raw, server):
    mid, tok = raw.request(POST, telemetry_path("tok1"), b'{"a":1}')
    first = raw.recv()
    assert first["type"] == CON and first["mid"] != mid and first["token"] == tok
    assert code_str(first["code"]) == "2.01"
    # Not ACKed: the server retransmits the same CON (same MID) after ACK_TIMEOUT (2-3 s).
    again = raw.recv(timeout=4)
    assert again is not None and again["mid"] == first["mid"] and again["type"] == CON
    raw.ack(again)
    assert raw.recv_all(3.5) == []  # ACKed: no more retransmissions
    assert server.records()[-1]["reply"] == "con-no-ack"


def test_framing_separate_and_piggyback(raw, server):
    server.check("framing separate")
    mid, tok = raw.request(POST, telemetry_path("tok1"), b'{"a":1}')
    ack, resp = raw.recv(), raw.recv()
    assert (ack["type"], ack["code"], ack["mid"]) == (ACK, 0, mid)
    assert resp["type"] == CON and resp["token"] == tok and code_str(resp["code"]) == "2.01"
    raw.ack(resp)
    server.check("framing piggyback")
    mid, tok = raw.request(POST, telemetry_path("tok1"), b'{"a":1}')
    m = raw.recv()
    assert (m["type"], m["mid"], code_str(m["code"])) == (ACK, mid, "2.01")
    assert server.command("framing bogus").startswith("error")


def test_non_request_gets_non_response(raw):
    mid, tok = raw.request(POST, telemetry_path("tok1"), b'{"a":1}', mtype=NON)
    m = raw.recv()
    assert m["type"] == NON and m["token"] == tok and code_str(m["code"]) == "2.01"
    mid, tok = raw.request(POST, telemetry_path("bad"), b'{"a":1}', mtype=NON)
    m = raw.recv()
    assert m["type"] == NON and code_str(m["code"]) == "4.01"


def test_delay_gives_empty_ack_then_separate_response(raw, server):
    server.check("delay 1200")
    t0 = time.monotonic()
    mid, tok = raw.request(POST, telemetry_path("wrong"), b'{"a":1}')
    ack = raw.recv()
    t_ack = time.monotonic() - t0
    resp = raw.recv()
    t_resp = time.monotonic() - t0
    assert (ack["type"], ack["code"], ack["mid"]) == (ACK, 0, mid)
    assert 0.4 <= t_ack < 1.1 and t_resp >= 1.1
    assert resp["type"] == CON and resp["token"] == tok and code_str(resp["code"]) == "4.01"
    raw.ack(resp)


# ---- §6.6 deduplication ------------------------------------------------------------------------
def test_duplicate_con_is_not_processed_twice(raw, server):
    mid, tok = raw.request(POST, telemetry_path("tok1"), b'{"a":1}')
    resp = raw.recv()
    assert resp["type"] == CON
    raw.request(POST, telemetry_path("tok1"), b'{"a":1}', mid=mid, token=tok)  # retransmission
    msgs = raw.recv_all(1.0)
    assert any(m["type"] == ACK and m["code"] == 0 and m["mid"] == mid for m in msgs)
    assert any(m["type"] == CON and m["mid"] == resp["mid"] for m in msgs)  # answer re-sent
    for m in msgs:
        if m["type"] == CON:
            raw.ack(m)
    assert len(server.points("dev1")) == 1
    assert server.records()[-1]["code"] == "duplicate"
    # A piggybacked answer is replayed byte for byte.
    mid, tok = raw.request(POST, telemetry_path("wrong"), b"{}")
    first = raw.recv()
    raw.request(POST, telemetry_path("wrong"), b"{}", mid=mid, token=tok)
    assert raw.recv() == first


def test_mid_reuse_is_swallowed(raw, server):
    mid, tok = raw.request(POST, telemetry_path("wrong"), b"{}")
    raw.recv()
    raw.request(POST, telemetry_path("tok1"), b'{"a":1}', mid=mid)  # new request, old MID
    m = raw.recv()
    assert code_str(m["code"]) == "4.01"  # the old answer comes back
    assert server.points() == []


# ---- §4 provisioning ---------------------------------------------------------------------------
def prov(raw, **fields):
    body = {"provisionDeviceKey": "pk", "provisionDeviceSecret": "ps", **fields}
    return raw.call(POST, "/api/v1/provision", json.dumps(body).encode())


FAILURE = {"errorMsg": "Failed to provision device!", "status": "FAILURE"}
NOT_FOUND = {"errorMsg": "Provision data was not found!", "status": "NOT_FOUND"}


def test_provision_allow_create(raw, server):
    mid, _ = raw.request(POST, "/api/v1/provision",
                         b'{"provisionDeviceKey":"pk","provisionDeviceSecret":"ps",'
                         b'"deviceName":" pump-7 "}')
    m = raw.recv()
    assert (m["type"], m["mid"], code_str(m["code"])) == (ACK, mid, "2.01")  # piggybacked
    assert opt_uint(m, CONTENT_FORMAT) == 0  # JSON labelled text/plain
    assert m["payload"].startswith(b'{"credentialsValue":')
    body = json.loads(m["payload"])
    assert body["credentialsType"] == "ACCESS_TOKEN" and body["status"] == "SUCCESS"
    token = body["credentialsValue"]
    assert len(token) == 20 and server.devices()["pump-7"] == token  # name trimmed
    assert code_str(raw.call(POST, telemetry_path(token), b'{"x":1}')["code"]) == "2.01"

    # Not idempotent: same name again -> FAILURE whatever the credentials.
    m = prov(raw, deviceName="pump-7")
    assert code_str(m["code"]) == "4.00" and json.loads(m["payload"]) == FAILURE
    # Requested token honoured; a token already used by another device -> FAILURE.
    assert json.loads(prov(raw, deviceName="p8", token="my-token")["payload"])["credentialsValue"] == "my-token"
    assert json.loads(prov(raw, deviceName="p9", token="tok1")["payload"]) == FAILURE
    assert json.loads(prov(raw, deviceName="   ")["payload"]) == FAILURE
    # No name: a random 20-character alphanumeric one.
    assert json.loads(prov(raw)["payload"])["status"] == "SUCCESS"
    assert any(len(n) == 20 and n.isalnum() for n in server.devices())
    # NOT_FOUND: wrong or empty secret.
    m = raw.call(POST, "/api/v1/provision",
                 b'{"provisionDeviceKey":"pk","provisionDeviceSecret":"nope","deviceName":"q"}')
    assert code_str(m["code"]) == "4.00" and json.loads(m["payload"]) == NOT_FOUND
    m = raw.call(POST, "/api/v1/provision",
                 b'{"provisionDeviceKey":"","provisionDeviceSecret":"","deviceName":"q"}')
    assert json.loads(m["payload"]) == NOT_FOUND
    # Empty-body 4.00: missing field, not an object, bad credentialsType, empty payload.
    for payload in (b'{"provisionDeviceKey":"pk","deviceName":"q"}', b"[]", b"", b"{bad",
                    b'{"provisionDeviceKey":"pk","provisionDeviceSecret":"ps",'
                    b'"credentialsType":"PSK"}'):
        m = raw.call(POST, "/api/v1/provision", payload)
        assert code_str(m["code"]) == "4.00" and m["payload"] == b"", payload
    # The token slot may hold anything (§4).
    m = raw.call(POST, "/api/v1/whatever/provision",
                 b'{"provisionDeviceKey":"pk","provisionDeviceSecret":"ps","deviceName":"p10"}')
    assert json.loads(m["payload"])["status"] == "SUCCESS"
    assert "q" not in server.devices()


def test_provision_pre_provisioned(tmp_path):
    with TbServer(BUILD_DIR, tmp_path, strategy="pre_provisioned", provision_key="pk",
                  provision_secret="ps", devices={"pump-7": "existing-token"}) as srv:
        r = Raw(srv.port)
        m = prov(r, deviceName="pump-7", token="ignored")
        assert code_str(m["code"]) == "2.01"
        assert json.loads(m["payload"]) == {"credentialsValue": "existing-token",
                                            "credentialsType": "ACCESS_TOKEN",
                                            "status": "SUCCESS"}
        assert json.loads(prov(r, deviceName="pump-7")["payload"]) == FAILURE  # second time
        assert json.loads(prov(r, deviceName="unknown")["payload"]) == FAILURE
        assert json.loads(prov(r)["payload"]) == FAILURE
        srv.restart()  # "provisioned" survives a restart
        r.addr = ("127.0.0.1", srv.port)
        assert json.loads(prov(r, deviceName="pump-7")["payload"]) == FAILURE
        r.close()


def test_provision_with_coap_client(server):
    res = coap_client(server.port, "post", "/api/v1/provision",
                      '{"provisionDeviceKey":"pk","provisionDeviceSecret":"ps","deviceName":"cc"}')
    assert json.loads(res.stdout.strip())["status"] == "SUCCESS"
    res = coap_client(server.port, "post", "/api/v1/provision",
                      '{"provisionDeviceKey":"pk","provisionDeviceSecret":"ps","deviceName":"cc"}')
    out = res.stdout + res.stderr
    assert "FAILURE" in out and "4.00" in out


def test_lost_provision_reply_then_retry_fails(raw, server):
    assert server.command("lose-provision-reply 1") == "ok"
    body = b'{"provisionDeviceKey":"pk","provisionDeviceSecret":"ps","deviceName":"lost"}'
    mid, tok = raw.request(POST, "/api/v1/provision", body)
    assert raw.recv(1.0) is None
    raw.request(POST, "/api/v1/provision", body, mid=mid, token=tok)  # retransmission: still lost
    assert raw.recv(1.0) is None
    assert "lost" in server.devices()  # the device WAS created
    m = raw.call(POST, "/api/v1/provision", body)  # a new request
    assert json.loads(m["payload"]) == FAILURE


# ---- §7 revoke, control switches ---------------------------------------------------------------
def test_revoke(raw, server):
    assert code_str(raw.call(POST, telemetry_path("tok1"), b'{"a":1}')["code"]) == "2.01"
    assert server.command("revoke tok1") == "ok"
    m = raw.call(POST, telemetry_path("tok1"), b'{"a":1}')
    assert code_str(m["code"]) == "4.01" and m["payload"] == b""
    assert server.devices()["dev1"] is None
    assert server.command("revoke tok1").startswith("error")


def test_fail_switches(raw, server):
    server.check("fail 2 5.00")
    codes = [code_str(raw.call(POST, telemetry_path("tok1"), b'{"a":1}')["code"]) for _ in range(3)]
    assert codes == ["5.00", "5.00", "2.01"]
    assert len(server.points("dev1")) == 1
    server.check("fail-all 5.00")
    assert code_str(raw.call(POST, "/api/v1/tok1/attributes", b'{"a":1}')["code"]) == "5.00"
    # Provisioning and auth are not affected by the fail switch.
    assert code_str(raw.call(POST, telemetry_path("nope"), b'{"a":1}')["code"]) == "4.01"
    server.check("fail-all off")
    assert code_str(raw.call(POST, telemetry_path("tok1"), b'{"a":1}')["code"]) == "2.01"
    assert server.command("fail 1 banana").startswith("error")


def test_drop_switches(raw, server):
    server.check("drop 1")
    mid, tok = raw.request(POST, telemetry_path("tok1"), b'{"a":1}')
    assert raw.recv(1.0) is None  # not even an ACK
    raw.request(POST, telemetry_path("tok1"), b'{"a":1}', mid=mid, token=tok)  # retransmission
    m = raw.recv()
    assert m is not None and code_str(m["code"]) == "2.01"
    raw.ack(m)
    server.check("drop-all on")
    raw.request(POST, telemetry_path("tok1"), b'{"a":1}')
    assert raw.recv(1.0) is None
    server.check("drop-all off")
    assert code_str(raw.call(POST, telemetry_path("tok1"), b'{"a":1}')["code"]) == "2.01"
    assert [r["code"] for r in server.records()].count("dropped") == 2
    assert len(server.points("dev1")) == 2


def test_stats_and_unknown_command(raw, server):
    raw.call(POST, telemetry_path("tok1"), b'{"a":1,"b":2}')
    s = server.stats()
    assert s["requests"] == 1 and s["points"] == 2 and s["framing"] == "con-no-ack"
    assert server.command("frobnicate").startswith("error")


# ---- §1 sizes and Block1 ----------------------------------------------------------------------
def test_block1_5000_bytes_with_coap_client(server, tmp_path):
    blob = "x" * 4980
    f = tmp_path / "big.json"
    f.write_text(json.dumps({"blob": blob}))
    assert f.stat().st_size > 4990
    res = coap_client(server.port, "post", telemetry_path("tok1"),
                      extra=["-b", "1024", "-f", str(f)])
    assert res.returncode == 0, res.stderr
    assert [p.value for p in server.points("dev1")] == [blob]
    recs = [r for r in server.records() if r["block1"]]
    assert [r["code"] for r in recs] == ["2.31"] * 4 + ["2.01"]
    assert recs[-1]["payload_bytes"] == f.stat().st_size and recs[-1]["blocks"] == 5


def test_block1_raw_rules(raw, server):
    body = json.dumps({"blob": "y" * 2000}).encode()
    blocks = [body[i:i + 1024] for i in range(0, len(body), 1024)]
    tok = b"\x09"
    for num, chunk in enumerate(blocks):
        more = num < len(blocks) - 1
        raw.request(POST, telemetry_path("tok1"), chunk, token=tok,
                    options=[(BLOCK1, uint_opt((num << 4) | (8 if more else 0) | 6))])
        m = raw.recv()
        if more:
            assert (m["type"], code_str(m["code"])) == (ACK, "2.31")
            assert opt_uint(m, BLOCK1) == (num << 4) | 8 | 6
        else:
            assert code_str(m["code"]) == "2.01" and opt_uint(m, BLOCK1) == (num << 4) | 6
            raw.ack(m)
    assert server.points("dev1")[0].value == "y" * 2000
    # SZX 7 (2048-byte blocks / BERT) is refused on UDP.
    raw.request(POST, telemetry_path("tok1"), b"z" * 100, options=[(BLOCK1, uint_opt(0x0F))])
    assert code_str(raw.recv()["code"]) == "4.02"
    # A block that does not continue a transfer -> 4.08.
    raw.request(POST, telemetry_path("tok1"), b"z" * 64, options=[(BLOCK1, uint_opt((3 << 4) | 8 | 2))])
    assert code_str(raw.recv()["code"]) == "4.08"


def test_oversize_datagram_dropped_silently(raw, server):
    raw.request(POST, telemetry_path("tok1"), json.dumps({"b": "q" * 2100}).encode())
    assert raw.recv(1.0) is None
    assert server.records()[-1]["code"] == "dropped_oversize"
    # Between 1024 and 2048 bytes without Block1: accepted like TB, but flagged.
    assert code_str(raw.call(POST, telemetry_path("tok1"),
                             json.dumps({"b": "q" * 1500}).encode())["code"]) == "2.01"
    assert server.records()[-1]["over_1024"] is True


def test_strict_size_drops_plain_payload_over_1024(tmp_path):
    with TbServer(BUILD_DIR, tmp_path, devices={"d": "t"}, strict_size=True) as srv:
        r = Raw(srv.port)
        r.request(POST, telemetry_path("t"), json.dumps({"b": "q" * 1100}).encode())
        assert r.recv(1.0) is None
        assert srv.records()[-1]["code"] == "dropped_oversize"
        assert code_str(r.call(POST, telemetry_path("t"), b'{"a":1}')["code"]) == "2.01"
        r.close()


# ---- restart ----------------------------------------------------------------------------------
def test_restart_keeps_devices_and_points(raw, server):
    m = prov(raw, deviceName="keeper")
    token = json.loads(m["payload"])["credentialsValue"]
    raw.call(POST, telemetry_path(token), b'{"v":1}')
    port = server.port
    server.restart()
    assert server.port == port
    assert server.devices()["keeper"] == token
    assert code_str(raw.call(POST, telemetry_path(token), b'{"v":2}')["code"]) == "2.01"
    assert [p.value for p in server.points("keeper")] == [1, 2]
    assert json.loads(prov(raw, deviceName="keeper")["payload"]) == FAILURE
    server.kill()  # a crash: state was written atomically
    server.start()
    assert server.devices()["keeper"] == token


def test_rpc_subscribe_and_revoke_ends_observations(raw, server):
    mid, tok = raw.request(GET, "/api/v1/tok1/rpc", options=[(OBSERVE, b"")])
    m = raw.recv()
    # §3.1 + §8: 2.03, empty, Observe=0, as a separate CON without an empty ACK.
    assert (m["type"], code_str(m["code"]), m["token"]) == (CON, "2.03", tok)
    assert m["mid"] != mid and opt_uint(m, OBSERVE) == 0 and m["payload"] == b""
    raw.ack(m)
    server.check("revoke tok1")
    m = raw.recv()
    assert code_str(m["code"]) == "2.02" and m["token"] == tok  # §7
    raw.ack(m)


def test_stdin_eof_stops_the_server(tmp_path):
    srv = TbServer(BUILD_DIR, tmp_path, devices={"d": "t"}).start()
    proc = srv.proc
    proc.stdin.close()
    assert proc.wait(5) == 0
    srv.proc = None
