# ctest-labels: integration
"""X.509 device identities in the test server, with real DTLS (docs/test-server.md "DTLS";
docs/thingsboard-coap.md §0 "How the device is identified", §4.1-4.2, §6.2 "X.509 identity
check").

libcoap's coap-client-openssl is the DTLS client: each run is one full handshake (with `-c cert
-j key` a client certificate, without one-way DTLS) and one request through tb-test-dtls-proxy.
Where one session must carry several requests (identity cached at the handshake, then a change on
the server, then another request), a raw UDP socket stands in for the proxy's upstream socket:
it sends the identity datagram the proxy sends after a handshake (0x00, "tb-x509\\n", PEM), then
plain CoAP. Certificates are made per run with the openssl command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent import wait_until  # noqa: E402
from tbserver import TbServer  # noqa: E402
from test_tbserver import POST, Raw, code_str  # noqa: E402

BUILD_DIR = os.environ.get("TB_BUILD_DIR", str(Path(__file__).resolve().parents[2] / "build"))
COAP_DTLS = shutil.which("coap-client-openssl")

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or COAP_DTLS is None,
                                reason="needs openssl and coap-client-openssl (libcoap3-bin)")

IDENTITY_PREFIX = b"\x00tb-x509\n"


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_cert(d, name, ca, days="1"):
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr",
            cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", days, "-out", f"{name}.crt", cwd=d)


def make_future_cert(d, name, ca):
    """A certificate valid only from 2099 on: `openssl x509` cannot set notBefore, `openssl ca`
    can (with a throwaway database)."""
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text("[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\nnew_certs_dir=.\n"
                              "serial=serial\ndefault_md=sha256\npolicy=p\n[p]\n"
                              "commonName=supplied\n")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr",
            cwd=d)
    openssl("ca", "-batch", "-config", "ca.cnf", "-cert", f"{ca}.crt", "-keyfile", f"{ca}.key",
            "-in", f"{name}.csr", "-out", f"{name}.crt", "-startdate", "20991231000000Z",
            "-enddate", "21000101000000Z", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
    openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=ca", "-days", "2",
            "-out", "ca.crt", cwd=d)
    for name in ("server", "registered", "stranger", "fresh"):
        make_cert(d, name, "ca")
    make_cert(d, "expired", "ca", days="-1")  # notAfter yesterday
    make_future_cert(d, "future", "ca")
    return d


@pytest.fixture
def server(tmp_path, pki):
    srv = TbServer(BUILD_DIR, tmp_path, provision_key="pk", provision_secret="ps",
                   devices={"token-dev": "tok1"},
                   x509_devices={"cert-dev": pki / "registered.crt"}, quiet=False)
    srv.start()
    yield srv
    srv.stop()


class DtlsProxy:
    def __init__(self, server, pki, log):
        self.log = log
        self.proc = subprocess.Popen(
            [str(Path(BUILD_DIR) / "tests" / "server" / "tb-test-dtls-proxy"),
             "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{server.port}",
             "--cert", str(pki / "server.crt"), "--key", str(pki / "server.key")],
            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "listening", log.read_text()
        self.port = int(line[1].rsplit(":", 1)[1])

    def stderr(self):
        return self.log.read_text()


@pytest.fixture
def proxy(server, pki, tmp_path):
    p = DtlsProxy(server, pki, tmp_path / "proxy.stderr.log")
    yield p
    p.proc.terminate()
    p.proc.wait(timeout=10)


def coaps(server, proxy, path, payload=None, cert=None, method="post", pki=None, extra=()):
    """One coap-client-openssl run (one handshake, one request); returns (records, output):
    the server's records of the requests it made, and what the client printed."""
    before = len(server.records())
    argv = [COAP_DTLS, "-v", "4", "-m", method, *extra]
    if payload is not None:
        argv += ["-e", payload]
    if cert:
        argv += ["-c", str(pki / f"{cert}.crt"), "-j", str(pki / f"{cert}.key")]
    argv.append(f"coaps://127.0.0.1:{proxy.port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return server.records()[before:], out.stdout + out.stderr


def only(records):
    assert len(records) == 1, records
    return records[0]


class Session:
    """A raw UDP socket standing in for one DTLS session's upstream socket in the proxy."""

    def __init__(self, server, pem=b""):
        self.raw = Raw(server.port)
        self.handshake(pem)

    def handshake(self, pem=b""):
        self.raw.send(IDENTITY_PREFIX + pem)

    def post(self, path, payload):
        m = self.raw.call(POST, path, payload.encode())
        assert m is not None, f"no answer to POST {path}"
        return code_str(m["code"]), m["payload"]

    def close(self):
        self.raw.close()


def provision(server, body):
    s = Raw(server.port)
    try:
        m = s.call(POST, "/api/v1/provision", json.dumps(body).encode())
        return code_str(m["code"]), json.loads(m["payload"]) if m["payload"] else None
    finally:
        s.close()


def test_registered_certificate_makes_token_less_requests_work(server, proxy, pki):
    for path, payload in (("/api/v1/telemetry", '{"t":21.5}'),
                          ("/api/v1/attributes", '{"fw":"v1"}'),
                          ("/api/v1/rpc/7", '{"ok":true}')):  # §0: the X.509 RPC-reply form
        rec = only(coaps(server, proxy, path, payload, cert="registered", pki=pki)[0])
        assert (rec["code"], rec["device"], rec["identity"], rec["token"]) == \
            ("2.01", "cert-dev", "x509", None), rec
    assert [p[0] for p in server.points("cert-dev")] == ["t"]
    assert server.attributes("cert-dev")["client"] == {"fw": "v1"}
    recs, out = coaps(server, proxy, "/api/v1/attributes?clientKeys=fw", method="get",
                      cert="registered", pki=pki)
    assert (only(recs)["code"], only(recs)["device"]) == ("2.05", "cert-dev")
    assert '{"client":{"fw":"v1"}}' in out
    # Observe on rpc and attributes, token-less (the client stops observing after 1 s).
    for feature, code in (("rpc", "2.03"), ("attributes", "2.05")):
        recs, _ = coaps(server, proxy, f"/api/v1/{feature}", method="get", cert="registered",
                        pki=pki, extra=("-s", "1"))
        # Only this run's registration: the previous run's deregistration (Observe=1) may be
        # recorded after this run began (a loaded machine, an ASan build).
        recs = [r for r in recs if r["path"] == f"/api/v1/{feature}" and r["observe"] == 0]
        assert recs and (recs[0]["code"], recs[0]["device"], recs[0]["identity"]) == \
            (code, "cert-dev", "x509"), recs
    assert "client certificate)" in proxy.stderr()
    assert "device cert-dev" in server.stderr()


def test_unregistered_certificate_completes_the_handshake_then_gets_4_01(server, proxy, pki):
    recs, out = coaps(server, proxy, "/api/v1/telemetry", '{"t":1}', cert="stranger", pki=pki)
    rec = only(recs)
    assert (rec["code"], rec["device"]) == ("4.01", None)
    assert "identity" not in rec
    assert "4.01" in out
    assert "is not registered" in server.stderr()
    assert not server.points()


def test_provisioned_certificate_counts_only_after_a_new_handshake(server, proxy, pki):
    pem = (pki / "fresh.crt").read_text()
    session = Session(server, pem.encode())  # handshake first: nothing registered yet
    try:
        code, body = provision(server, {"provisionDeviceKey": "pk", "provisionDeviceSecret": "ps",
                                        "deviceName": "fresh-dev",
                                        "credentialsType": "X509_CERTIFICATE", "hash": pem})
        assert (code, body) == ("2.01", {"credentialsValue": pem,
                                         "credentialsType": "X509_CERTIFICATE",
                                         "status": "SUCCESS"})
        # ThingsBoard looked the certificate up at handshake time, when it was unknown.
        assert session.post("/api/v1/telemetry", '{"t":1}')[0] == "4.01"
        session.handshake(pem.encode())  # a new full handshake
        assert session.post("/api/v1/telemetry", '{"t":2}')[0] == "2.01"
    finally:
        session.close()
    rec = only(coaps(server, proxy, "/api/v1/telemetry", '{"t":3}', cert="fresh", pki=pki)[0])
    assert (rec["code"], rec["device"], rec["identity"]) == ("2.01", "fresh-dev", "x509")
    # Persisted: after a restart the certificate still names the device.
    assert server.state()["devices"]["fresh-dev"]["x509"] == pem
    assert server.state()["devices"]["fresh-dev"]["token"] is None
    server.restart()
    rec = only(coaps(server, proxy, "/api/v1/telemetry", '{"t":4}', cert="fresh", pki=pki)[0])
    assert (rec["code"], rec["device"]) == ("2.01", "fresh-dev")
    assert [p[2] for p in server.points("fresh-dev")] == [2, 3, 4]


@pytest.mark.parametrize("extra, why", [
    ({"hash": "registered"}, "certificate of another device"),
    ({}, "no hash"),
    ({"hash": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}, "garbage"),
])
def test_x509_provisioning_failures(server, pki, extra, why):
    if extra.get("hash") == "registered":
        extra = {"hash": (pki / "registered.crt").read_text()}
    code, body = provision(server, {"provisionDeviceKey": "pk", "provisionDeviceSecret": "ps",
                                    "deviceName": "new-dev",
                                    "credentialsType": "X509_CERTIFICATE", **extra})
    assert (code, body) == ("4.00", {"errorMsg": "Failed to provision device!",
                                     "status": "FAILURE"}), why
    assert "new-dev" not in server.devices()


def test_a_token_in_the_uri_is_ignored_when_an_identity_is_cached(server, proxy, pki):
    for token in ("tok1", "no-such-token"):
        rec = only(coaps(server, proxy, f"/api/v1/{token}/telemetry", '{"t":1}',
                         cert="registered", pki=pki)[0])
        assert (rec["code"], rec["token"], rec["device"], rec["identity"]) == \
            ("2.01", token, "cert-dev", "x509")
    assert not server.points("token-dev")


@pytest.mark.parametrize("cert", ["expired", "future"])
def test_an_expired_or_not_yet_valid_client_certificate_is_refused_in_the_handshake(
        server, proxy, pki, cert):
    recs, out = coaps(server, proxy, "/api/v1/tok1/telemetry", '{"t":1}', cert=cert, pki=pki)
    assert recs == []  # nothing reached the server
    assert "bad certificate" in out  # §6.2: fatal bad_certificate alert
    # The client exits on the alert, which the proxy may send before it logs the failure.
    wait_until(lambda: "failed" in proxy.stderr(), timeout=10, what="the proxy's handshake failure")


def test_forget_x509_drops_cached_identities_until_a_new_handshake(server, proxy, pki):
    coaps(server, proxy, "/api/v1/telemetry", '{"t":0}', cert="registered", pki=pki)
    session = Session(server, (pki / "registered.crt").read_bytes())
    try:
        assert session.post("/api/v1/telemetry", '{"t":1}')[0] == "2.01"
        assert server.stats()["x509_cached"] == 2
        server.check("forget-x509")
        assert server.stats()["x509_cached"] == 0
        assert session.post("/api/v1/telemetry", '{"t":2}')[0] == "4.01"
        session.handshake((pki / "registered.crt").read_bytes())
        assert session.post("/api/v1/telemetry", '{"t":3}')[0] == "2.01"
    finally:
        session.close()
    assert [p[2] for p in server.points("cert-dev")] == [0, 1, 3]


def test_revoke_x509_removes_the_credential_and_the_cached_identities(server, proxy, pki):
    session = Session(server, (pki / "registered.crt").read_bytes())
    try:
        assert session.post("/api/v1/telemetry", '{"t":1}')[0] == "2.01"
        server.check("revoke-x509 cert-dev")
        assert session.post("/api/v1/telemetry", '{"t":2}')[0] == "4.01"
    finally:
        session.close()
    rec = only(coaps(server, proxy, "/api/v1/telemetry", '{"t":3}', cert="registered",
                     pki=pki)[0])
    assert rec["code"] == "4.01"
    assert server.state()["devices"]["cert-dev"]["x509"] is None
    assert server.command("revoke-x509 cert-dev").startswith("error")
    assert server.command("revoke-x509 nobody").startswith("error")
    # The certificate is free again: it can be provisioned for another device.
    code, body = provision(server, {"provisionDeviceKey": "pk", "provisionDeviceSecret": "ps",
                                    "deviceName": "second-life",
                                    "credentialsType": "X509_CERTIFICATE",
                                    "hash": (pki / "registered.crt").read_text()})
    assert body["status"] == "SUCCESS"


def test_a_session_without_a_client_certificate_still_works_with_a_token(server, proxy, pki):
    rec = only(coaps(server, proxy, "/api/v1/tok1/telemetry", '{"t":1}', pki=pki)[0])
    assert (rec["code"], rec["device"], rec["identity"]) == ("2.01", "token-dev", "token")
    rec = only(coaps(server, proxy, "/api/v1/telemetry", '{"t":2}', pki=pki)[0])
    assert rec["code"] == "4.01"
    assert "no client certificate" in proxy.stderr()
