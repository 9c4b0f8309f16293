# ctest-labels: integration
"""CoAP over DTLS (server.dtls; docs/security.md): the real agent against tb-test-server behind
tb-test-dtls-proxy (DTLS 1.2 terminated in front of the plain server, as ThingsBoard's transport
does). Certificates are made per test session with the openssl command."""
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from agent import build_dir, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET
from test_dbus_agent import bus, prop, wait_prop  # noqa: F401 (bus is a fixture)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl("req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
            "-out", f"{name}.crt", cwd=d)


def make_cert(d, name, ca, days="1", san="DNS:localhost,IP:127.0.0.1"):
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", "/CN=localhost", "-out",
            f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", days, "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=d)
    os.chmod(d / f"{name}.key", 0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "server", "ca")
    make_cert(d, "untrusted", "other-ca")
    make_cert(d, "expired", "ca", days="-1")
    make_cert(d, "elsewhere", "ca", san="DNS:tb.elsewhere.example")
    return d


class DtlsProxy:
    """tb-test-dtls-proxy in front of a tb-test-server."""

    def __init__(self, server, cert, key, port=0):
        self.proc = subprocess.Popen(
            [str(build_dir() / "tests" / "server" / "tb-test-dtls-proxy"),
             "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{server.port}",
             "--cert", str(cert), "--key", str(key)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "listening", self.proc.stderr.read()
        self.port = int(line[1].rsplit(":", 1)[1])

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def proxies():
    made = []

    def start(*args, **kw):
        p = DtlsProxy(*args, **kw)
        made.append(p)
        return p

    yield start
    for p in made:
        if p.proc.poll() is None:
            p.stop()


def dtls_config(server, port, pki, tmp_path, *, host="localhost", **dtls):
    value = tmp_path / "value"
    value.write_text("21.5\n")
    return {
        "server": {**server_config(server), "host": host, "port": port,
                   "dtls": {"ca_file": str(pki / "ca.crt"), **dtls}},
        "device": {"name": "secure-1"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "room", "type": "file", "path": str(value), "key": "t",
                     "interval": "200ms"}],
        "delivery": {"flush_interval": "0", "backoff_initial": "200ms", "backoff_max": "1s"},
        "dbus": {"bus": "system"},
    }


def mapped(pid):
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in f if "/" in line}


def test_provisioning_and_telemetry_over_dtls_with_server_verification(
        server, agents, proxies, pki, tmp_path, bus):
    proxy = proxies(server, pki / "server.crt", pki / "server.key")
    agent = agents(dtls_config(server, proxy.port, pki, tmp_path))
    agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
    wait_until(lambda: server.points("secure-1"), what="telemetry over DTLS")
    assert agent.credentials()["credentialsValue"] == server.devices()["secure-1"]  # over DTLS
    wait_prop(bus, "State", lambda v: v == "running", "== running")
    assert prop(bus, "Server") == f"coaps://localhost:{proxy.port}"
    libs = mapped(agent.proc.pid)
    assert any(lib.startswith("libcoap-3-openssl") for lib in libs), libs
    assert not any(lib.startswith("libcoap-3-notls") for lib in libs), libs
    assert agent.stop() == 0


@pytest.mark.parametrize("cert,host,reason", [
    ("untrusted", "localhost", "unable to get local issuer certificate"),
    ("elsewhere", "localhost", "is not for 'localhost'"),
    ("expired", "localhost", "certificate has expired"),
    ("server", "127.0.0.2", "is not for '127.0.0.2'"),
])
def test_a_refused_server_certificate_sends_nothing_and_says_why(
        server, agents, proxies, pki, tmp_path, bus, cert, host, reason):
    proxy = proxies(server, pki / f"{cert}.crt", pki / f"{cert}.key")
    cfg = dtls_config(server, proxy.port, pki, tmp_path)
    if host != "localhost":
        cfg["server"]["dtls"]["server_name"] = host  # the name to check; still 127.0.0.1
    agent = agents(cfg)
    agent.start(env={"DBUS_SYSTEM_BUS_ADDRESS": bus})
    wait_prop(bus, "LastError", lambda v: reason in v and "DTLS handshake" in v,
              f"names the reason ({reason})")
    assert prop(bus, "State") in ("provisioning", "retrying")
    agent.wait_log(reason)  # the journal says it too, once per attempt
    time.sleep(1)
    assert server.records() == [], "nothing reached the server"
    assert agent.credentials() is None
    assert agent.stop() == 0


def is_dtls_record(datagram):
    # RFC 6347 §4.1: content type 20..25, then version {254, 253} (DTLS 1.2) or {254, 255} (1.0,
    # allowed in a ClientHello's record layer).
    return (len(datagram) >= 13 and 20 <= datagram[0] <= 25 and datagram[1] == 254 and
            datagram[2] in (253, 255))


def test_no_plain_coap_ever_leaves_and_delivery_recovers(server, agents, proxies, pki, tmp_path):
    # The DTLS port answers nothing (a server down, or a middlebox eating the handshake): every
    # datagram the agent sends there is a DTLS record, none is CoAP, and the plain server hears
    # nothing. Then the DTLS server comes up on that port and everything queued arrives.
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    sink.settimeout(0.5)
    cfg = dtls_config(server, port, pki, tmp_path)
    cfg["server"]["request_timeout"] = "2s"
    agent = agents(cfg)
    agent.start()
    seen = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            seen.append(sink.recv(65536))
        except socket.timeout:
            pass
    assert seen, "the agent tried the DTLS port"
    assert all(is_dtls_record(d) for d in seen), [d[:4].hex() for d in seen]
    assert server.records() == []
    sink.close()
    proxies(server, pki / "server.crt", pki / "server.key", port=port)
    wait_until(lambda: server.points("secure-1"), timeout=30, what="delivery after recovery")
    assert agent.stop() == 0


def test_reload_reads_renewed_ca_and_key_files(server, agents, proxies, pki, tmp_path):
    # The CA file is replaced in place (same path) by one that trusts the server: a reload picks
    # it up without a restart.
    ca = tmp_path / "trusted.pem"
    shutil.copy(pki / "other-ca.crt", ca)
    proxy = proxies(server, pki / "server.crt", pki / "server.key")
    cfg = dtls_config(server, proxy.port, pki, tmp_path)
    cfg["server"]["dtls"]["ca_file"] = str(ca)
    agent = agents(cfg)
    agent.start()
    agent.wait_log("unable to get local issuer certificate")
    shutil.copy(pki / "ca.crt", ca)
    agent.send_signal(signal.SIGHUP)
    agent.wait_log("DTLS: the CA, certificate and key files are read again")
    wait_until(lambda: server.points("secure-1"), timeout=30, what="telemetry after the reload")
    assert agent.stop() == 0


def test_check_config_refuses_an_open_private_key_and_a_lone_certificate(agents, pki, tmp_path):
    key = tmp_path / "device.key"
    shutil.copy(pki / "server.key", key)
    os.chmod(key, 0o644)
    cfg = {"server": {"host": "localhost",
                      "dtls": {"ca_file": str(pki / "ca.crt"),
                               "cert_file": str(pki / "server.crt"), "key_file": str(key)}},
           "credentials": {"access_token": "t"}, "state_dir": str(tmp_path / "state"),
           "dbus": {"bus": "none"}}
    agent = agents(cfg)
    r = agent.run_once("--check-config")
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"the private key {key} is open to group or others (mode 0644)" in out, out
    os.chmod(key, 0o600)
    assert agent.run_once("--check-config").returncode == 0
    del cfg["server"]["dtls"]["key_file"]
    agent.write_config(cfg)
    r = agent.run_once("--check-config")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "key_file is missing" in out, out
    cfg["server"]["dtls"] = {"ca_file": str(tmp_path / "nowhere.pem")}
    agent.write_config(cfg)
    r = agent.run_once("--check-config")
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "cannot read" in out and "nowhere.pem" in out, out


@pytest.mark.parametrize("case,needle", [
    ("mismatched", "does not belong to the certificate"),
    ("expired", "has expired"),
    ("garbage-ca", "holds no PEM certificate"),
    ("garbage-key", "holds no PEM private key"),
])
def test_check_config_and_start_refuse_unusable_dtls_files(agents, pki, tmp_path, case, needle):
    key = tmp_path / "device.key"
    shutil.copy(pki / ("untrusted.key" if case == "mismatched" else "server.key"), key)
    if case == "garbage-key":
        key.write_text("not a key\n")
    os.chmod(key, 0o600)
    ca = tmp_path / "ca.pem"
    shutil.copy(pki / "ca.crt", ca)
    if case == "garbage-ca":
        ca.write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
    cert = pki / ("expired.crt" if case == "expired" else "server.crt")
    if case == "expired":
        shutil.copy(pki / "expired.key", key)
        os.chmod(key, 0o600)
    cfg = {"server": {"host": "localhost",
                      "dtls": {"ca_file": str(ca), "cert_file": str(cert), "key_file": str(key)}},
           "credentials": {"access_token": "t"}, "state_dir": str(tmp_path / "state"),
           "dbus": {"bus": "none"}}
    agent = agents(cfg)
    r = agent.run_once("--check-config")
    out = r.stdout + r.stderr
    assert r.returncode == 78 and needle in out, out
    # Start agrees with --check-config: a configuration error (78), not a handshake loop.
    r = agent.run_once(timeout=30)
    assert r.returncode == 78 and needle in r.stdout + r.stderr, r.stdout + r.stderr
