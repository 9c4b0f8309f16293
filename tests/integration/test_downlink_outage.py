# ctest-labels: integration slow
"""An outage of 2 minutes by default (every datagram dropped, as when the uplink is gone): afterwards the agent's
observations are registered again and the shared state resynced without an operator
(docs/attributes.md "Keeping observations alive"). Slow: the outage is real time.

TB_DOWNLINK_OUTAGE_S (default 125) is the outage and TB_DOWNLINK_REREGISTER (default 2m, the
agent's default) its re-registration interval; the outage must last longer than that interval, so
that a whole re-registration fails inside it (CI runs 40 s with 20s)."""
import os
import time

from agent import wait_until
from test_downlink import (DEVICE, config, observing, rpc_result, srv)  # noqa: F401 (fixture)


def test_an_outage_then_observations_and_state_come_back(srv, agents, tmp_path):
    cfg = config(srv, tmp_path)
    outage_s = float(os.environ.get("TB_DOWNLINK_OUTAGE_S", "125"))
    cfg["downlink"] = {"reregister_interval": os.environ.get("TB_DOWNLINK_REREGISTER", "2m")}
    a = agents(cfg).start()
    wait_until(lambda: observing(srv), 20, what="both observations registered")
    before = srv.observers(DEVICE)
    srv.check("drop-all on")
    time.sleep(outage_s / 2)
    srv.command(f'set-shared {DEVICE} {{"host_interval":"11s"}}')  # made during the outage
    time.sleep(outage_s / 2)
    srv.check("drop-all off")
    # Registrations failed during the outage and are retried with backoff (at most 1 min).
    a.wait_log("applied host_interval=\"11s\"", timeout=120)

    # Both registered again after the outage (new tokens): the registrations from before it are
    # gone with the agent's old socket, and an RPC sent to them would be lost. The one answered
    # first ends the other's backoff, so they come back together.
    def registered_again():
        o = srv.observers(DEVICE)
        return all(o[k] is not None and o[k]["token"] != before[k]["token"]
                   for k in ("attributes", "rpc"))
    wait_until(registered_again, 30, what=f"observations back ({srv.observers(DEVICE)})")
    r = rpc_result(srv, srv.send_rpc(DEVICE, "echo", 10000), timeout=30)
    assert r["response"]["output"] == "hello\n"
    assert a.running()
