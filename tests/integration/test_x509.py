# ctest-labels: integration
"""X.509 device identity (issue 11; docs/security.md): the real agent against tb-test-server
behind tb-test-dtls-proxy, which asks for client certificates and tells the server whose they
are, as ThingsBoard does in its handshake (docs/test-server.md "DTLS"; thingsboard-coap.md §6.2).
Certificates are made per test session with the openssl command."""
import json
import os
import shutil
import signal
import stat
import subprocess
import socket
import sys
import time

import pytest

from agent import build_dir, server_config, source_dir, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET
from tbserver import TbServer
from test_dtls import make_ca, make_cert, openssl, proxies  # noqa: F401 (proxies is a fixture)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

INTERVAL_MS = 300
# A gap this long between stored readings of a source that reads every INTERVAL_MS means some
# were lost (generous: the machine may be loaded).
MAX_GAP_MS = 2500


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_cert(d, "server", "ca")
    # Device certificates: a self-signed one each is enough (ThingsBoard checks no CA, §6.2).
    for name in ("meter-1", "meter-2", "stranger"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
                "-out", f"{name}.crt", cwd=d)
        os.chmod(d / f"{name}.key", 0o600)
    return d


@pytest.fixture
def x509_server(tmp_path, pki):
    srv = TbServer(build_dir(), tmp_path, provision_key=PROVISION_KEY,
                   provision_secret=PROVISION_SECRET, strategy="allow_create",
                   x509_devices={"meter-1": pki / "meter-1.crt", "meter-2": pki / "meter-2.crt"})
    srv.start()
    yield srv
    srv.stop()


def own_copy(pki, tmp_path, name):
    """The device's certificate and key where the agent reads them (0600 key)."""
    d = tmp_path / "identity"
    d.mkdir(exist_ok=True)
    for ext in ("crt", "key"):
        shutil.copy(pki / f"{name}.{ext}", d / f"device.{ext}")
    os.chmod(d / "device.key", 0o600)
    return d / "device.crt", d / "device.key"


def x509_config(port, pki, tmp_path, *, cert=None, key=None, provision=False, name="meter-1",
                backoff_max="1s"):
    value = tmp_path / "value"
    value.write_text("21.5\n")
    dtls = {"ca_file": str(pki / "ca.crt")}
    if cert:
        dtls.update(cert_file=str(cert), key_file=str(key))
    cfg = {
        "server": {"host": "localhost", "port": port, "request_timeout": "3s", "dtls": dtls},
        "device": {"name": name},
        "sources": [{"name": "room", "type": "file", "path": str(value), "key": "t",
                     "interval": f"{INTERVAL_MS}ms"}],
        "delivery": {"flush_interval": "0", "backoff_initial": "200ms",
                     "backoff_max": backoff_max},
    }
    if provision:
        cfg["provisioning"] = {"key": PROVISION_KEY, "secret": PROVISION_SECRET,
                               "credentials_type": "x509_certificate"}
    else:
        cfg["credentials"] = {"type": "x509_certificate"}
    return cfg


def telemetry(records, code=None):
    return [r for r in records if r.get("feature") == "telemetry"
            and (code is None or r.get("code") == code)]


def payload_points(record):
    """(key, ts) of every reading a telemetry request carried."""
    body = json.loads(record["payload"])
    out = set()
    for item in body if isinstance(body, list) else [body]:
        for k in item.get("values", {}):
            out.add((k, item["ts"]))
    return out


def stored(server, device):
    return {(p[0], p[1]) for p in server.points(device)}


def assert_no_gap(server, device):
    ts = sorted(p[1] for p in server.points(device))
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert ts and max(gaps, default=0) <= MAX_GAP_MS, f"readings lost: gaps {sorted(gaps)[-5:]}"


def test_telemetry_with_a_pre_registered_certificate_uses_token_less_paths(
        x509_server, agents, proxies, pki, tmp_path):
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    cert, key = own_copy(pki, tmp_path, "meter-1")
    agent = agents(x509_config(proxy.port, pki, tmp_path, cert=cert, key=key))
    assert agent.run_once("--check-config").stdout.strip() == "OK"
    agent.start()
    wait_until(lambda: len(x509_server.points("meter-1")) >= 3, timeout=30,
               what="telemetry of the X.509 device")
    sent = telemetry(x509_server.records(), "2.01")
    assert sent and all(r["path"] == "/api/v1/telemetry" for r in sent), sent[:3]
    assert all(r["identity"] == "x509" and r["device"] == "meter-1" for r in sent)
    # Attributes too: the client attributes the agent publishes go token-less.
    wait_until(lambda: any(r.get("feature") == "attributes" and r["method"] == "POST"
                           and r["code"] == "2.01" for r in x509_server.records()),
               timeout=30, what="client attributes")
    assert all("/api/v1/attributes" == r["path"].split("?")[0]
               for r in x509_server.records() if r.get("feature") == "attributes")
    assert agent.stop() == 0


def test_provisioning_with_a_generated_key(x509_server, agents, proxies, pki, tmp_path):
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    agent = agents(x509_config(proxy.port, pki, tmp_path, provision=True, name="gen-7"))
    # Nothing generated yet, and the setup is valid.
    assert agent.run_once("--check-config").stdout.strip() == "OK"
    assert not (agent.state_dir / "device.key").exists()
    agent.start()
    wait_until(lambda: x509_server.points("gen-7"), timeout=30, what="telemetry after provisioning")
    key, crt = agent.state_dir / "device.key", agent.state_dir / "device.crt"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    subject = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-subject", "-enddate"],
                             capture_output=True, text=True, check=True).stdout
    assert "CN = gen-7" in subject and "9999" in subject, subject
    text = subprocess.run(["openssl", "pkey", "-in", str(key), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "prime256v1" in text or "P-256" in text, text[:200]
    creds = agent.credentials()
    assert creds["credentialsType"] == "X509_CERTIFICATE", creds
    prov = [r for r in x509_server.records() if r.get("feature") == "provision"]
    assert prov and json.loads(prov[0]["payload"])["hash"] == crt.read_text()
    assert "-----BEGIN" not in agent.log(), "a key or certificate in the log"
    sent = telemetry(x509_server.records(), "2.01")
    assert all(r["path"] == "/api/v1/telemetry" and r["identity"] == "x509" for r in sent)
    # The token-less requests after provisioning ran on a fresh handshake: none was refused.
    assert not telemetry(x509_server.records(), "4.01")
    assert agent.stop() == 0
    # A restart keeps the same identity (not generated again) and goes on delivering.
    key_before = key.read_bytes()
    n = len(x509_server.points("gen-7"))
    agent.start()
    wait_until(lambda: len(x509_server.points("gen-7")) > n + 2, timeout=30,
               what="telemetry after a restart")
    assert key.read_bytes() == key_before
    assert len([r for r in x509_server.records() if r.get("feature") == "provision"]) == 1
    assert agent.stop() == 0


def test_an_unregistered_certificate_is_unauthorized_after_one_fresh_handshake(
        x509_server, agents, proxies, pki, tmp_path):
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    cert, key = own_copy(pki, tmp_path, "stranger")
    # backoff_max is also the unauthorized probe interval: none comes within this test.
    agent = agents(x509_config(proxy.port, pki, tmp_path, cert=cert, key=key,
                               backoff_max="10m"))
    agent.start()
    agent.wait_log("server rejected the device's X.509 certificate", timeout=30)
    time.sleep(2)  # anything more would come now (the retry is immediate)
    refused = telemetry(x509_server.records())
    assert [r["code"] for r in refused] == ["4.01", "4.01"], refused
    # The retry came on a new DTLS session: the proxy relays each session from a socket of its own.
    assert refused[0]["peer"] != refused[1]["peer"], refused
    assert agent.log().count("retrying once on a fresh DTLS handshake") == 1
    assert agent.running()
    assert agent.stop() == 0


def test_forgotten_identities_cost_one_fresh_handshake_and_nothing_else(
        x509_server, agents, proxies, pki, tmp_path):
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    cert, key = own_copy(pki, tmp_path, "meter-1")
    agent = agents(x509_config(proxy.port, pki, tmp_path, cert=cert, key=key))
    agent.start()
    wait_until(lambda: len(x509_server.points("meter-1")) >= 3, timeout=30, what="telemetry")
    x509_server.check("forget-x509")
    wait_until(lambda: telemetry(x509_server.records(), "4.01"), timeout=30,
               what="a request refused after forget-x509")
    n = len(x509_server.points("meter-1"))
    wait_until(lambda: len(x509_server.points("meter-1")) >= n + 5, timeout=30,
               what="delivery going on after forget-x509")
    assert "rejected the device's X.509 certificate" not in agent.log()
    assert agent.log().count("retrying once on a fresh DTLS handshake") >= 1
    # Every reading a refused request carried was delivered later.
    have = stored(x509_server, "meter-1")
    for r in telemetry(x509_server.records(), "4.01"):
        assert payload_points(r) <= have, r
    assert agent.stop() == 0
    assert_no_gap(x509_server, "meter-1")


class UdpProxy:
    """tests/tools/udp_proxy.py: here a NAT between the agent and the DTLS proxy."""

    def __init__(self, upstream_port, tmp_path):
        self.ctl = tmp_path / "nat.sock"
        self.proc = subprocess.Popen(
            [sys.executable, str(source_dir() / "tests" / "tools" / "udp_proxy.py"),
             "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{upstream_port}",
             "--control", str(self.ctl)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        self.port = int(line.rsplit(":", 1)[1])

    def command(self, line):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.ctl))
            s.sendall(line.encode() + b"\n")
            return s.makefile().readline().strip()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def test_a_nat_rebinding_leads_to_a_fresh_handshake_and_nothing_is_lost(
        x509_server, agents, proxies, pki, tmp_path):
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    nat = UdpProxy(proxy.port, tmp_path)
    try:
        cert, key = own_copy(pki, tmp_path, "meter-1")
        agent = agents(x509_config(nat.port, pki, tmp_path, cert=cert, key=key))
        agent.start()
        wait_until(lambda: len(x509_server.points("meter-1")) >= 3, timeout=30, what="telemetry")
        peers = {r["peer"] for r in telemetry(x509_server.records(), "2.01")}
        assert nat.command("rebind") == "ok"
        wait_until(lambda: {r["peer"] for r in telemetry(x509_server.records(), "2.01")} - peers,
                   timeout=60, what="delivery on a new session after the rebinding")
        n = len(x509_server.points("meter-1"))
        wait_until(lambda: len(x509_server.points("meter-1")) >= n + 5, timeout=30,
                   what="delivery going on")
        assert agent.running()
        assert agent.stop() == 0
        assert_no_gap(x509_server, "meter-1")
    finally:
        nat.stop()


def test_a_renewed_certificate_is_used_after_a_reload(x509_server, agents, proxies, pki, tmp_path):
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    cert, key = own_copy(pki, tmp_path, "meter-1")
    agent = agents(x509_config(proxy.port, pki, tmp_path, cert=cert, key=key))
    agent.start()
    wait_until(lambda: x509_server.points("meter-1"), timeout=30, what="telemetry as meter-1")
    # Renewed in place (same paths): the server knows the new certificate as meter-2.
    shutil.copy(pki / "meter-2.key", key)
    shutil.copy(pki / "meter-2.crt", cert)
    os.chmod(key, 0o600)
    agent.send_signal(signal.SIGHUP)
    agent.wait_log("certificate and key files are read again")
    wait_until(lambda: x509_server.points("meter-2"), timeout=30,
               what="telemetry with the renewed certificate")
    assert agent.stop() == 0


def test_a_lost_provisioning_answer_is_recovered_on_a_fresh_handshake(
        x509_server, agents, proxies, pki, tmp_path):
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    cfg = x509_config(proxy.port, pki, tmp_path, provision=True, name="gen-8")
    cfg["server"]["request_timeout"] = "1s"
    agent = agents(cfg)
    x509_server.check("lose-provision-reply 1")
    agent.start()
    creds = wait_until(agent.credentials, timeout=30, what="credentials after a lost answer")
    assert creds["credentialsType"] == "X509_CERTIFICATE", creds
    assert "earlier provisioning answer was lost" in agent.log()
    provisions = [r for r in x509_server.records() if r.get("feature") == "provision"]
    assert [r.get("provision_status") for r in provisions][-1] == "FAILURE", provisions
    # The check: a token-less GET that found our device, on a session whose handshake came after
    # the device existed.
    checks = [r for r in x509_server.records()
              if r.get("feature") == "attributes" and r["method"] == "GET"
              and r["t"] > provisions[-1]["t"]]
    assert checks and checks[0]["path"].startswith("/api/v1/attributes"), checks
    assert checks[0]["code"] in ("2.05", "4.04") and checks[0]["device"] == "gen-8", checks[0]
    wait_until(lambda: x509_server.points("gen-8"), timeout=30, what="telemetry")
    assert agent.stop() == 0


def test_a_failure_with_our_certificate_unregistered_is_final(
        x509_server, agents, proxies, pki, tmp_path):
    # A retry (the record says one request went before) of a name another certificate holds.
    proxy = proxies(x509_server, pki / "server.crt", pki / "server.key")
    agent = agents(x509_config(proxy.port, pki, tmp_path, provision=True, name="meter-1"))
    agent.state_dir.mkdir(parents=True, exist_ok=True)
    (agent.state_dir / "provisioning.json").write_text(json.dumps(
        {"deviceName": "meter-1", "credentialsType": "X509_CERTIFICATE", "token": "",
         "attempts": 1, "firstAttemptMs": 1}))
    agent.start()
    agent.wait_log("our certificate is not registered", timeout=30)
    assert agent.credentials() is None
    checks = [r for r in x509_server.records() if r.get("feature") == "attributes"]
    assert checks and checks[-1]["code"] == "4.01", checks
    assert agent.running()
    assert agent.stop() == 0
