# ctest-labels: integration
"""The spine end to end: provisioning, file and exec sources, delivery, outages, 5.00, 4.01,
lost provisioning answers, Block1 — the real tb-agent against tb-test-server on loopback."""
import json
import os
import signal
import stat
import time

from agent import server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET


def counter_script(tmp_path, name="counter"):
    """An exec source program that counts its runs: {"seq": n}. The file holds the last n."""
    state = tmp_path / f"{name}.n"
    script = tmp_path / f"{name}.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"n=$(cat {state} 2>/dev/null || echo 0)\n"
        "n=$((n+1))\n"
        'printf \'{"seq": %d, "ok": true, "label": "run-%d"}\\n\' $n $n\n'
        # Counted only once printed: a run the agent kills at its timeout (a loaded machine) gives
        # its number to the next run instead of leaving a gap the test would call a lost reading.
        # Written aside and renamed: a test reading the count never sees a truncated file.
        f"echo $n > {state}.tmp && mv {state}.tmp {state}\n")
    script.chmod(0o755)
    return script, state


def base_config(server, tmp_path, sources, **extra):
    cfg = {
        "server": server_config(server),
        "device": {"name": "pump-7"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": sources,
        "delivery": {"flush_interval": "100ms", "backoff_initial": "200ms", "backoff_max": "2s",
                     "shutdown_timeout": "3s"},
    }
    cfg.update(extra)
    return cfg


def values(server, device, key):
    """[(ts, value)] of one telemetry key stored for a device."""
    return sorted((p[1], p[2]) for p in server.points(device) if p[0] == key)


def telemetry_requests(server):
    return [r for r in server.records() if r.get("feature") == "telemetry"]


def test_first_start_provisions_and_second_start_does_not(server, agents, tmp_path):
    temp = tmp_path / "temp_input"
    temp.write_text("21500\n")
    agent = agents(base_config(server, tmp_path, [
        {"name": "room", "type": "file", "path": str(temp), "key": "temperature",
         "scale": 0.001, "interval": "200ms"}]))
    agent.start()
    creds = wait_until(agent.credentials, what="credentials.json")
    assert creds["credentialsType"] == "ACCESS_TOKEN"
    assert creds["deviceName"] == "pump-7"
    assert server.devices()["pump-7"] == creds["credentialsValue"]
    mode = stat.S_IMODE(os.stat(agent.state_dir / "credentials.json").st_mode)
    assert mode == 0o600
    wait_until(lambda: len(values(server, "pump-7", "temperature")) >= 3, what="telemetry")
    assert all(v == 21.5 for _, v in values(server, "pump-7", "temperature"))
    assert agent.stop() == 0
    # No temporary files next to the credentials (atomic write), no pending provisioning record.
    assert not [p for p in agent.state_dir.iterdir() if p.name.startswith(".credentials")]
    assert not (agent.state_dir / "provisioning.json").exists()

    provisions = [r for r in server.records() if r.get("feature") == "provision"]
    assert len(provisions) == 1
    before = len(values(server, "pump-7", "temperature"))
    agent.start()
    wait_until(lambda: len(values(server, "pump-7", "temperature")) >= before + 3,
               what="telemetry after restart")
    assert agent.stop() == 0
    assert len([r for r in server.records() if r.get("feature") == "provision"]) == 1
    # The provisioning secret never reaches a log.
    assert PROVISION_SECRET not in agent.log()
    assert creds["credentialsValue"] not in agent.log()


def test_file_and_exec_readings_arrive_with_their_own_timestamps(server, agents, tmp_path):
    temp = tmp_path / "temp_input"
    temp.write_text("42\n")
    script, _ = counter_script(tmp_path)
    agent = agents(base_config(server, tmp_path, [
        {"name": "room", "type": "file", "path": str(temp), "key": "raw", "interval": "300ms"},
        {"name": "counter", "type": "exec", "command": [str(script)], "interval": "250ms",
         "timeout": "200ms"}]))
    started_ms = time.time() * 1000
    agent.start()
    wait_until(lambda: len(values(server, "pump-7", "seq")) >= 4, what="exec readings")
    wait_until(lambda: len(values(server, "pump-7", "raw")) >= 3, what="file readings")
    agent.stop()
    ended_ms = time.time() * 1000
    seq = values(server, "pump-7", "seq")
    # Each collection has its own timestamp, taken when it was read, in ms.
    assert len({ts for ts, _ in seq}) == len(seq)
    assert all(started_ms - 1000 <= ts <= ended_ms for ts, _ in seq)
    assert [v for _, v in seq] == list(range(1, len(seq) + 1))
    # Values keep their types: integers, booleans, strings.
    assert all(v is True for _, v in values(server, "pump-7", "ok"))
    assert values(server, "pump-7", "label")[0][1] == "run-1"
    assert all(v == 42 and isinstance(v, int) for _, v in values(server, "pump-7", "raw"))
    # Readings of one collection share one {"ts", "values"} object.
    req = telemetry_requests(server)[0]
    body = json.loads(req["payload"])
    assert isinstance(body, list) and all(set(o) == {"ts", "values"} for o in body)


def test_server_outage_loses_nothing(server, agents, tmp_path):
    script, state = counter_script(tmp_path)
    agent = agents(base_config(server, tmp_path, [
        {"name": "counter", "type": "exec", "command": [str(script)], "interval": "200ms",
         "timeout": "150ms"}]))
    agent.start()
    wait_until(lambda: len(values(server, "pump-7", "seq")) >= 2, what="first readings")
    server.stop()
    time.sleep(3)  # ~15 collections while the server is gone
    server.start()
    time.sleep(1)
    assert agent.stop() == 0
    produced = int(state.read_text())
    # Delivered after the server came back (the agent flushes on SIGTERM too).
    wait_until(lambda: len(values(server, "pump-7", "seq")) >= produced or None, timeout=2,
               what="all readings")
    got = sorted({v for _, v in values(server, "pump-7", "seq")})
    assert got == list(range(1, produced + 1)), f"missing {set(range(1, produced + 1)) - set(got)}"


def test_5xx_is_retried_with_growing_jittered_delays(server, agents, tmp_path):
    script, _ = counter_script(tmp_path)
    cfg = base_config(server, tmp_path, [
        {"name": "counter", "type": "exec", "command": [str(script)], "interval": "1s",
         "timeout": "500ms"}])
    cfg["delivery"].update({"backoff_initial": "100ms", "backoff_max": "1600ms"})
    agent = agents(cfg)
    agent.start()
    wait_until(lambda: values(server, "pump-7", "seq"), what="first reading")
    server.command("fail-all 5.00")
    time.sleep(7)
    failures = [r for r in telemetry_requests(server) if r.get("code") == "5.00"]
    assert len(failures) >= 5
    gaps = [b["t"] - a["t"] for a, b in zip(failures, failures[1:])]
    # Capped exponential: no gap beyond the cap (plus scheduling slack); the ceiling grows, so
    # later gaps are on average longer than the first ones; full jitter: gaps are not all equal.
    assert max(gaps) <= 1600 + 600, gaps  # the cap plus generous scheduling slack (ASan, CI)
    assert sum(gaps[-3:]) / 3 > sum(gaps[:2]) / 2, gaps
    assert len(set(gaps)) > 1
    assert "server answered 5.00" in agent.log()
    server.command("fail-all off")
    wait_until(lambda: len(values(server, "pump-7", "seq")) >= 6, timeout=10,
               what="delivery after 5.00 stops")
    agent.stop()
    got = [v for _, v in values(server, "pump-7", "seq")]
    assert sorted(set(got)) == list(range(1, max(got) + 1))


def test_401_stops_sending_and_keeps_every_reading(server, agents, tmp_path):
    script, state = counter_script(tmp_path)
    agent = agents(base_config(server, tmp_path, [
        {"name": "counter", "type": "exec", "command": [str(script)], "interval": "200ms",
         "timeout": "150ms"}]))
    agent.start()
    creds = wait_until(agent.credentials, what="provisioning")
    wait_until(lambda: values(server, "pump-7", "seq"), what="first reading")
    server.command(f"revoke {creds['credentialsValue']}")
    agent.wait_log("server rejected the access token (4.01)")
    n_after_401 = len(telemetry_requests(server))
    time.sleep(1.5)
    # Sending stopped: nothing for 1.5 s although readings keep coming every 200 ms (the agent
    # only probes the token again after delivery.backoff_max, 2 s here).
    assert len(telemetry_requests(server)) == n_after_401
    assert agent.stop() == 0
    produced = int(state.read_text())
    # The operator gives the device a valid token: everything queued arrives.
    server.stop()
    server.options["devices"] = {"pump-7b": "NEWTOKEN123"}
    server.start()
    cfg = agent.config
    cfg["credentials"] = {"access_token": "NEWTOKEN123"}
    agent.write_config(cfg)
    agent.start()
    wait_until(lambda: len(values(server, "pump-7b", "seq")) + len(values(server, "pump-7", "seq"))
               >= produced, what="queued readings after the token is fixed")
    agent.stop()
    got = {v for _, v in values(server, "pump-7", "seq")} | {v for _, v in values(server, "pump-7b", "seq")}
    assert set(range(1, produced + 1)) <= got


def test_lost_provisioning_answer_is_recovered_with_the_proposed_token(server, agents, tmp_path):
    temp = tmp_path / "t"
    temp.write_text("1\n")
    cfg = base_config(server, tmp_path, [
        {"name": "room", "type": "file", "path": str(temp), "key": "x", "interval": "300ms"}])
    cfg["server"]["request_timeout"] = "1s"
    agent = agents(cfg)
    server.command("lose-provision-reply 1")
    agent.start()
    creds = wait_until(agent.credentials, timeout=20, what="credentials after a lost answer")
    provisions = [r for r in server.records() if r.get("feature") == "provision"]
    assert len(provisions) >= 2  # the lost one and the retry, which ThingsBoard answers FAILURE
    assert server.devices()["pump-7"] == creds["credentialsValue"]
    assert "earlier provisioning answer was lost" in agent.log()
    wait_until(lambda: values(server, "pump-7", "x"), what="telemetry with the recovered token")
    agent.stop()


def test_provisioning_refused_is_an_operator_problem_not_a_retry_storm(server, agents, tmp_path):
    cfg = base_config(server, tmp_path, [])
    cfg["provisioning"]["secret"] = "wrong-secret"
    agent = agents(cfg)
    agent.start()
    agent.wait_log("NOT_FOUND")
    time.sleep(2)
    assert len([r for r in server.records() if r.get("feature") == "provision"]) == 1
    assert agent.running(), "the agent stays up in state failed instead of restart-looping"
    assert "wrong-secret" not in agent.log()
    assert agent.stop() == 0


def test_batch_over_1024_bytes_arrives_intact_through_block1(server, agents, tmp_path):
    script = tmp_path / "wide.sh"
    keys = {f"sensor_{i:03d}_with_a_rather_long_key_name": i * 1.5 for i in range(60)}
    script.write_text("#!/bin/sh\ncat <<'EOF'\n" + json.dumps(keys) + "\nEOF\n")
    script.chmod(0o755)
    agent = agents(base_config(server, tmp_path, [
        {"name": "wide", "type": "exec", "command": [str(script)], "interval": "10s"}]))
    agent.start()
    wait_until(lambda: values(server, "pump-7", "sensor_059_with_a_rather_long_key_name"),
               what="wide record")
    agent.stop()
    big = [r for r in telemetry_requests(server) if r.get("payload_bytes", 0) > 1024]
    assert big and all(r.get("block1") for r in big)
    for k, v in keys.items():
        assert values(server, "pump-7", k)[0][1] == v


def test_misbehaving_exec_sources_do_not_disturb_the_others(server, agents, tmp_path):
    temp = tmp_path / "t"
    temp.write_text("7\n")
    agent = agents(base_config(server, tmp_path, [
        {"name": "good", "type": "file", "path": str(temp), "key": "good", "interval": "200ms"},
        {"name": "hangs", "type": "exec", "command": ["/bin/sleep", "60"], "interval": "2s",
         "timeout": "500ms"},
        {"name": "crashes", "type": "exec", "command": ["/bin/sh", "-c", "kill -SEGV $$"],
         "interval": "1s", "timeout": "500ms"},
        {"name": "garbage", "type": "exec", "command": ["/bin/echo", "not json at all"],
         "interval": "1s", "timeout": "500ms"}]))
    agent.start()
    wait_until(lambda: len(values(server, "pump-7", "good")) >= 8, what="good source readings")
    log = agent.log()
    assert "hangs" in log and "timed out" in log
    assert "crashes" in log and "SIGSEGV" in log
    assert "garbage" in log
    assert agent.stop() == 0
    # The hung child was killed, not left behind.
    out = os.popen("pgrep -f '/bin/[s]leep 60'").read().strip()
    assert out == ""


def test_sigterm_drains_and_exits_zero(server, agents, tmp_path):
    script, state = counter_script(tmp_path)
    cfg = base_config(server, tmp_path, [
        {"name": "counter", "type": "exec", "command": [str(script)], "interval": "200ms",
         "timeout": "150ms"}])
    cfg["delivery"]["flush_interval"] = "5s"  # readings wait in the queue...
    agent = agents(cfg)
    agent.start()
    wait_until(agent.credentials, what="provisioning")
    time.sleep(1.5)
    assert agent.stop(signal.SIGTERM) == 0  # ...and the last flush on SIGTERM sends them
    produced = int(state.read_text())
    assert {v for _, v in values(server, "pump-7", "seq")} == set(range(1, produced + 1))


def test_a_name_already_taken_is_a_final_failure(tmp_path, agents):
    from agent import build_dir
    from tbserver import TbServer
    with TbServer(build_dir(), tmp_path / "srv", provision_key=PROVISION_KEY,
                  provision_secret=PROVISION_SECRET, strategy="allow_create",
                  devices={"pump-7": "SOMEONE_ELSES_TOKEN"}) as srv:
        agent = agents(base_config(srv, tmp_path, []))
        agent.start()
        agent.wait_log("already exists or was already provisioned")
        time.sleep(1.5)
        # One request: a FAILURE on the first attempt cannot hide a lost answer of ours.
        assert len([r for r in srv.records() if r.get("feature") == "provision"]) == 1
        assert agent.credentials() is None
        assert agent.running()
        assert agent.stop() == 0
