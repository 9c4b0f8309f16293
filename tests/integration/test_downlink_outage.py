# ctest-labels: integration slow
"""A 2-minute outage (every datagram dropped, as when the uplink is gone): afterwards the agent's
observations are registered again and the shared state resynced without an operator
(docs/attributes.md "Keeping observations alive"). Slow: the outage is real time."""
import time

from agent import wait_until
from test_downlink import (DEVICE, config, observing, rpc_result, srv)  # noqa: F401 (fixture)


def test_two_minute_outage_then_observations_and_state_come_back(srv, agents, tmp_path):
    cfg = config(srv, tmp_path)
    cfg["downlink"] = {"reregister_interval": "2m"}  # the default
    a = agents(cfg).start()
    wait_until(lambda: observing(srv), 20, what="both observations registered")
    srv.check("drop-all on")
    time.sleep(60)
    srv.command(f'set-shared {DEVICE} {{"host_interval":"11s"}}')  # made during the outage
    time.sleep(65)
    srv.check("drop-all off")
    # Registrations failed during the outage and are retried with backoff (at most 1 min).
    a.wait_log("applied host_interval=\"11s\"", timeout=120)
    wait_until(lambda: observing(srv), 30, what="observations back")
    r = rpc_result(srv, srv.send_rpc(DEVICE, "echo", 10000), timeout=30)
    assert r["response"]["output"] == "hello\n"
    assert a.running()
