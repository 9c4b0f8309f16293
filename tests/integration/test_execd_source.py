# ctest-labels: integration
"""type: execd end to end: the real agent runs a long-lived /bin/sh program, its lines reach
tb-test-server as telemetry (stamped on arrival or with their own ts), its stderr is logged with
the source's name, a reload that changes its command restarts it, and a program that ignores
SIGTERM is killed with SIGKILL after the grace, on reload and on shutdown (docs/sources.md)."""
import json
import os
import signal
import time

from agent import Agent, server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET

OWN_TS = 1700000000123


def script(pid_file, tag):
    # Ignores SIGTERM and SIGPIPE (its pipes are closed on stop; only SIGKILL ends it), reports its pid, says hello on stderr, prints a
    # line with its own ts, then one line a 200 ms with a counter.
    return ("trap '' TERM PIPE; echo $$ > " + str(pid_file) + "; echo 'hello from " + tag + "' >&2; "
            "echo '{\"ts\":" + str(OWN_TS) + ",\"own\":1}'; i=0; "
            "while :; do i=$((i+1)); echo \"{\\\"tag\\\":\\\"" + tag + "\\\",\\\"n\\\":$i}\"; "
            "sleep 0.2; done")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_test_mode_prints_the_first_line(tmp_path):
    a = Agent(tmp_path, {
        "server": {"host": "192.0.2.1"},  # never contacted
        "sources": [{"name": "modem", "type": "execd",
                     "command": ["/bin/sh", "-c", "sleep 0.2; echo '{\"rssi\":-71}'; sleep 60"]}]})
    r = a.run_once("--test")
    assert r.returncode == 0, r.stderr
    batch = json.loads(r.stdout)
    assert batch[0]["values"] == {"rssi": -71}


def test_interval_on_an_execd_source_is_refused(tmp_path):
    a = Agent(tmp_path, {
        "server": {"host": "192.0.2.1"},
        "sources": [{"name": "modem", "type": "execd", "command": ["/bin/cat"],
                     "interval": "5s"}]})
    r = a.run_once("--check-config")
    assert r.returncode == 78, r
    assert "interval" in r.stdout


def test_lines_reach_the_server_and_reload_and_shutdown_stop_the_program(server, agents, tmp_path):
    pid_file = tmp_path / "modem.pid"
    cfg = {
        "server": server_config(server),
        "device": {"name": "gateway-1"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "modem", "type": "execd",
                     "command": ["/bin/sh", "-c", script(pid_file, "first")]}],
        "delivery": {"flush_interval": "100ms", "shutdown_timeout": "15s"},
    }
    agent = agents(cfg)
    started_ms = int(time.time() * 1000)
    agent.start()
    wait_until(lambda: len([p for p in server.points("gateway-1") if p.key == "n"]) >= 3,
               timeout=20, what=f"three execd readings\n{agent.log()[-2000:]}")
    points = server.points("gateway-1")
    own = [p for p in points if p.key == "own"]
    assert own and own[0].ts == OWN_TS, own
    assert not [p for p in points if p.key == "ts"]
    counted = [p for p in points if p.key == "n"]
    assert all(p.ts >= started_ms for p in counted)
    assert [p.value for p in counted][:3] == [1, 2, 3]
    agent.wait_log("source 'modem': stderr: hello from first")
    first_pid = int(pid_file.read_text())
    assert alive(first_pid)

    # Reload with a changed command: the old program (ignoring SIGTERM) is killed after the
    # grace, a new one starts.
    pid_file.unlink()
    agent.config["sources"][0]["command"] = ["/bin/sh", "-c", script(pid_file, "second")]
    agent.write_config()
    agent.send_signal(signal.SIGHUP)
    agent.wait_log("source 'modem' changed: restarted with its new settings")
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=10,
               what="the second program")
    second_pid = int(pid_file.read_text())
    assert second_pid != first_pid
    time.sleep(1)
    assert alive(first_pid), "killed before the grace: SIGTERM alone cannot end it"
    wait_until(lambda: not alive(first_pid), timeout=15, what="the first program killed")
    assert "did not exit after SIGTERM; sending SIGKILL" in agent.log()
    wait_until(lambda: any(p.value == "second" for p in server.points("gateway-1")
                           if p.key == "tag"), timeout=20, what="readings of the second program")

    # Shutdown waits for the program, SIGKILLs it after the grace, then exits cleanly.
    t0 = time.monotonic()
    assert agent.stop() == 0
    assert time.monotonic() - t0 >= 4, "the agent did not give the program its grace"
    assert not alive(second_pid)
    assert agent.log().count("did not exit after SIGTERM; sending SIGKILL") == 2


def test_check_config_refuses_a_missing_working_directory(tmp_path):
    for source_type in ("exec", "execd"):
        source = {"name": "s", "type": source_type, "command": ["/bin/true"],
                  "working_directory": str(tmp_path / "missing"), "env": {"MODEM": "x"}}
        a = Agent(tmp_path, {"server": {"host": "192.0.2.1"}, "sources": [source]},
                  name=source_type)
        r = a.run_once("--check-config")
        assert r.returncode == 78, r
        assert f"source 's': working_directory {tmp_path / 'missing'}: No such file or directory" \
            in r.stdout, r.stdout
        (tmp_path / "missing").mkdir()
        r = a.run_once("--check-config")
        assert r.returncode == 0 and r.stdout.startswith("OK"), r
        (tmp_path / "missing").rmdir()
