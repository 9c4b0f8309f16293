# ctest-labels: integration
"""The real tb-agent's downlink against the real tb-test-server (docs/attributes.md,
docs/attributes.md): client attributes published on start and on change, shared attributes applied
live as `remote:` allows and refused otherwise, deleted keys, server-side RPC (built-ins,
configured commands, unknown methods, re-sent requests, ids restarting from 0), observations
re-registered after a server restart, hostile notifications refused."""
import os
import signal
import subprocess
import time

import pytest

from agent import server_config, wait_until
from tbserver import TbServer
from agent import build_dir
from test_dbus_agent import bus, wait_prop  # noqa: F401  (bus: the private system bus fixture)

TOKEN = "downlink-token"
DEVICE = "dev1"


@pytest.fixture
def srv(tmp_path):
    s = TbServer(build_dir(), tmp_path, devices={DEVICE: TOKEN})
    s.start()
    yield s
    s.stop()


def config(srv, tmp_path, **extra):
    marker = tmp_path / "marker"
    cfg = {
        "server": server_config(srv),
        "credentials": {"access_token": TOKEN},
        "device": {"name": DEVICE},
        "sources": [{"name": "host", "type": "system", "interval": "30s", "metrics": ["uptime"]}],
        "attributes": {"site": "plant-3", "floor": 2},
        "remote": {"host_interval": "sources.host.interval", "agent_log_level": "log_level"},
        "rpc": {
            "echo": {"command": ["/bin/echo", "hello"], "timeout": "5s"},
            "mark": {"command": ["/bin/sh", "-c", f"sleep 5; echo run >> {marker}"],
                     "timeout": "10s"},
            "slow": {"command": ["/bin/sleep", "30"], "timeout": "1s"},
        },
        "downlink": {"reregister_interval": "10s"},
    }
    cfg.update(extra)
    return cfg


def client_attrs(srv):
    return srv.attributes(DEVICE)["client"]


def rpc_result(srv, rpc_id, timeout=20):
    def done():
        for r in srv.rpcs(DEVICE):
            if r["id"] == rpc_id and r["state"] in ("SUCCESSFUL", "EXPIRED"):
                return r
        return None
    return wait_until(done, timeout, what=f"RPC {rpc_id} answered ({srv.rpcs(DEVICE)})")


def observing(srv):
    o = srv.observers(DEVICE)
    return o["attributes"] is not None and o["rpc"] is not None


def os_pretty_name():
    """PRETTY_NAME of os-release(5), as the agent reports it."""
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            lines = open(path).read().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            if line.startswith("PRETTY_NAME="):
                v = line[len("PRETTY_NAME="):]
                return v[1:-1] if len(v) >= 2 and v[0] in "\"'" else v
    return ""


@pytest.fixture
def running(srv, agents, tmp_path):
    a = agents(config(srv, tmp_path)).start()
    wait_until(lambda: observing(srv), 20, what="both observations registered")
    yield a


def test_client_attributes_published_on_start(srv, running):
    attrs = wait_until(lambda: client_attrs(srv).get("site") and client_attrs(srv), 15,
                       what="client attributes")
    assert attrs["site"] == "plant-3" and attrs["floor"] == 2
    assert attrs["agent_version"] and attrs["hostname"] and attrs["kernel"]
    assert attrs["os"] == os_pretty_name(), attrs["os"]
    assert attrs["sources"] == {"host": "30s"}
    assert isinstance(attrs["ip_addresses"], list)
    def posts():
        return [r for r in srv.records()
                if r.get("feature") == "attributes" and r["method"] == "POST"]
    wait_until(posts, 15, what="the POST's record")
    # Unchanged facts are not sent again: a reload publishes the facts again, and nothing changed.
    running.send_signal(signal.SIGHUP)
    running.wait_log("configuration reloaded")
    time.sleep(1)
    assert len(posts()) == 1


def test_shared_attribute_applied_live_refused_and_deleted(srv, running):
    wait_until(lambda: client_attrs(srv).get("sources"), 15, what="client attributes")
    srv.check(f'set-shared {DEVICE} {{"host_interval":"5s"}}')
    running.wait_log("applied host_interval=\"5s\"", timeout=30)
    # Applied live: the source restarted with the new interval, and the fact is published.
    wait_until(lambda: client_attrs(srv)["sources"] == {"host": "5s"}, 15, what="interval fact")
    # Only the changed key went out.
    # (the state file is written before the request's record: wait for the record too)
    def change():
        posts = [r["attributes"] for r in srv.records() if r.get("feature") == "attributes"
                 and r["method"] == "POST" and r.get("attributes")]
        return [p for p in posts if p.get("sources") == {"host": "5s"}]
    assert set(wait_until(change, 15, what="the change's record")[0]) == {"sources"}
    # A key remote: does not name, and a bad value for one it does, are refused and reported.
    srv.check(f'set-shared {DEVICE} {{"server_host":"evil.example.com"}}')
    running.wait_log("refused server_host=\"evil.example.com\": not allowed by remote:")
    srv.check(f'set-shared {DEVICE} {{"agent_log_level":"loud"}}')
    running.wait_log("refused agent_log_level=\"loud\" (log_level): must be one of")
    # A deleted key: back to the file's value.
    srv.check(f"delete-shared {DEVICE} host_interval")
    running.wait_log("host_interval deleted (back to the file's value)")
    wait_until(lambda: client_attrs(srv)["sources"] == {"host": "30s"}, 15, what="interval back")
    assert running.running()


def test_shared_attribute_present_at_start_is_applied(srv, agents, tmp_path):
    srv.check(f'set-shared {DEVICE} {{"host_interval":"7s"}}')
    a = agents(config(srv, tmp_path)).start()
    a.wait_log("applied host_interval=\"7s\"")
    wait_until(lambda: client_attrs(srv).get("sources") == {"host": "7s"}, 15, what="7s fact")


def test_rpc_builtins_commands_and_unknown_methods(srv, running, tmp_path):
    r = rpc_result(srv, srv.send_rpc(DEVICE, "getStatus", 10000))
    assert r["state"] == "SUCCESSFUL"
    assert r["response"]["device_name"] == DEVICE and r["response"]["state"]
    r = rpc_result(srv, srv.send_rpc(DEVICE, "echo", 10000))
    assert r["response"]["output"] == "hello\n" and r["response"]["exit_code"] == 0
    r = rpc_result(srv, srv.send_rpc(DEVICE, "rm", 10000, {"path": "/"}))
    assert r["response"] == {"error": "unknown method 'rm'"}
    r = rpc_result(srv, srv.send_rpc(DEVICE, "slow", 10000))
    assert r["response"]["error"] == "timed out after 1s"
    r = rpc_result(srv, srv.send_rpc(DEVICE, "flush", 10000))
    assert r["response"] == {"result": "flushing"}
    r = rpc_result(srv, srv.send_rpc(DEVICE, "reload", 10000))
    assert r["response"] == {"result": "reloaded"}
    running.wait_log("RPC rm (id 2): unknown method")
    assert not (tmp_path / "marker").exists()


def test_resent_request_runs_once_and_restarted_ids_are_served(srv, running, tmp_path):
    marker = tmp_path / "marker"
    rpc_id = srv.send_rpc(DEVICE, "mark", 30000)
    running.wait_log("RPC mark (id 0) received")
    # While it runs, the server ends the observation; the agent registers again and ThingsBoard
    # sends the pending request again: it must not run twice.
    srv.check(f"end-observe {DEVICE} rpc")
    # (the command sleeps 5 s: time enough for the re-registration on a loaded machine)
    running.wait_log("RPC mark (id 0) sent again while it runs", timeout=30)
    r = rpc_result(srv, rpc_id, timeout=40)
    assert r["state"] == "SUCCESSFUL" and r["response"]["exit_code"] == 0
    time.sleep(1)
    assert marker.read_text() == "run\n"
    # The device's actor restarts: ids start from 0 again, the same method and params come as
    # id 0: a new request (the old one's reply was acknowledged), so it runs.
    srv.check(f"actor-restart {DEVICE}")
    assert srv.send_rpc(DEVICE, "mark", 30000) == 0
    wait_until(lambda: [r["state"] for r in srv.rpcs(DEVICE)] == ["SUCCESSFUL", "SUCCESSFUL"],
               40, what=f"second mark answered ({srv.rpcs(DEVICE)})")
    assert marker.read_text() == "run\nrun\n"


def test_server_restart_then_observations_come_back(srv, running):
    wait_until(lambda: client_attrs(srv).get("sources"), 15, what="client attributes")
    srv.restart()  # observations and RPCs live in memory: gone, silently
    assert srv.observers(DEVICE) == {"attributes": None, "rpc": None}
    # Re-registered within reregister_interval (10 s) without an operator.
    wait_until(lambda: observing(srv), 30, what="observations re-registered")
    srv.check(f'set-shared {DEVICE} {{"host_interval":"6s"}}')
    running.wait_log("applied host_interval=\"6s\"")
    r = rpc_result(srv, srv.send_rpc(DEVICE, "echo", 10000))
    assert r["response"]["output"] == "hello\n"


def test_outage_then_observations_and_state_come_back(srv, running):
    # The server goes silent (every datagram dropped, as in a network outage): registrations
    # time out, the agent keeps trying with backoff; a change made meanwhile is picked up by the
    # resync once the server answers again, without an operator.
    srv.check("drop-all on")
    running.wait_log("observation no answer", timeout=30)
    srv.command(f'set-shared {DEVICE} {{"host_interval":"8s"}}')  # nobody observes: not sent
    time.sleep(5)
    srv.check("drop-all off")
    running.wait_log("applied host_interval=\"8s\"", timeout=90)
    wait_until(lambda: observing(srv), 30, what="observations back")


def test_deliveries_working_again_renew_the_observations(srv, agents, tmp_path):
    # The server is away long enough for deliveries to fail, then back (same port, same state):
    # its observations are gone silently. With a 10-minute interval only the agent noticing that
    # deliveries work again brings them back soon.
    cfg = config(srv, tmp_path)
    cfg["sources"][0]["interval"] = "500ms"
    cfg["delivery"] = {"flush_interval": "100ms", "backoff_initial": "300ms", "backoff_max": "1s"}
    cfg["downlink"] = {"reregister_interval": "10m"}
    a = agents(cfg).start()
    wait_until(lambda: observing(srv), 20, what="both observations registered")
    srv.stop()
    a.wait_log("delivery failed", timeout=30)
    srv.start()
    a.wait_log("deliveries work again: registering the observations again", timeout=30)
    wait_until(lambda: observing(srv), 30, what="observations back")
    srv.check(f'set-shared {DEVICE} {{"host_interval":"3s"}}')
    a.wait_log("applied host_interval=\"3s\"", timeout=30)


def test_hostile_notifications_are_refused_and_the_agent_goes_on(srv, running):
    deep = "[" * 20 + "1" + "]" * 20
    srv.check(f'set-shared {DEVICE} {{"host_interval":{deep}}}')
    running.wait_log("shared attributes notification refused: nested deeper than 8 levels")
    srv.check(f'set-shared {DEVICE} {{"host_interval":12}}')  # wrong type for a duration? no:
    running.wait_log("applied host_interval=12")               # a number of seconds is fine
    srv.check(f'set-shared {DEVICE} {{"host_interval":{{"a":1}}}}')
    running.wait_log("refused host_interval={\"a\":1} (sources.host.interval)")
    # A huge value: more than a datagram holds (libcoap drops it unread, as a NAT or MTU would);
    # the agent goes on, and the next periodic registration (10 s) resyncs once it is gone.
    srv.check(f'set-shared {DEVICE} {{"blob":"{"x" * 3000}"}}')
    srv.check(f"delete-shared {DEVICE} blob")
    srv.check(f'set-shared {DEVICE} {{"host_interval":"9s"}}')
    running.wait_log("applied host_interval=\"9s\"", timeout=40)
    assert running.running()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the policy lets root own the name")
def test_observation_state_remote_changes_and_rpc_on_dbus_and_in_status(srv, agents, tmp_path,
                                                                        bus):
    address = bus
    cfg = config(srv, tmp_path)
    cfg["dbus"] = {"bus": "system"}
    a = agents(cfg).start(env={"DBUS_SYSTEM_BUS_ADDRESS": address})
    wait_prop(address, "AttributesObservation", lambda v: v == "observing", "== observing")
    wait_prop(address, "RpcObservation", lambda v: v == "observing", "== observing")
    srv.check(f'set-shared {DEVICE} {{"host_interval":"4s","colour":"red"}}')
    wait_prop(address, "LastRemoteChange", lambda v: v.startswith("applied host_interval"),
              "applied")
    srv.check(f'set-shared {DEVICE} {{"colour":"blue"}}')
    wait_prop(address, "LastRemoteChange",
              lambda v: v == 'refused colour="blue": not allowed by remote:', "refused")
    rpc_result(srv, srv.send_rpc(DEVICE, "echo", 10000))
    wait_prop(address, "LastRpc", lambda v: v == "echo (id 0): ok", "echo ok")
    out = subprocess.run([str(a.binary), "status", "--config", str(a.config_path)],
                         env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Downlink: attributes observing, RPC observing" in out.stdout
    assert "Last RPC: echo (id 0): ok" in out.stdout
    assert 'Remote: refused colour="blue": not allowed by remote:' in out.stdout
    assert a.stop() == 0
