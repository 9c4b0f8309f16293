# ctest-labels: integration
"""The command line contract (docs/interface.md): --check-config, --test, --version, --help, exit codes."""
import re
import subprocess

from agent import Agent, build_dir, source_dir


def run(*args, timeout=30):
    return subprocess.run([str(build_dir() / "src" / "tb-agent"), *args], capture_output=True,
                          text=True, timeout=timeout)


def test_version_and_help():
    r = run("--version")
    assert r.returncode == 0 and re.search(r"tb-agent \d+\.\d+\.\d+", r.stdout + r.stderr)
    r = run("--help")
    assert r.returncode == 0
    for flag in ("--config", "--check-config", "--test", "--version"):
        assert flag in r.stdout


def test_check_config_accepts_the_default_config():
    r = run("--check-config", "--config", str(source_dir() / "config" / "tb-agent.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "OK"


def test_check_config_reports_every_problem_with_its_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server:\n"
        "  host: example.com\n"
        "  port: notaport\n"
        "  colour: blue\n"
        "sources:\n"
        "  - name: a\n"
        "    type: file\n"
        "    path: /tmp/x\n"
        "    key: k\n"
        "    interval: 5 parsecs\n"
        "  - name: a\n"
        "    type: exec\n"
        "    command: []\n")
    r = run("--check-config", "--config", str(bad))
    assert r.returncode == 78
    out = r.stdout + r.stderr
    lines = [l for l in out.splitlines() if l.startswith(str(bad) + ":")]
    positions = {tuple(map(int, l.split(":")[1:3])) for l in lines}
    assert (3, 9) in positions, out      # port value
    assert (4, 3) in positions, out      # unknown key
    assert (10, 15) in positions, out    # bad duration
    assert any(p[0] == 11 for p in positions), out  # duplicate name
    assert any(p[0] == 13 for p in positions), out  # empty command


def test_agent_with_a_broken_config_exits_78_without_starting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [\n")
    r = run("--config", str(bad), "--log-target=stderr")
    assert r.returncode == 78
    assert str(bad) + ":" in r.stdout + r.stderr


def test_missing_config_file_is_a_config_error(tmp_path):
    r = run("--check-config", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 78


def test_test_mode_prints_one_batch_and_touches_no_state(tmp_path):
    temp = tmp_path / "t"
    temp.write_text("21500\n")
    a = Agent(tmp_path, {
        "server": {"host": "192.0.2.1"},  # never contacted
        "sources": [
            {"name": "room", "type": "file", "path": str(temp), "key": "temperature",
             "scale": 0.001, "interval": "30s"},
            {"name": "s", "type": "exec", "command": ["/bin/echo", '{"a": 1, "b": "x"}'],
             "interval": "30s"}]})
    r = a.run_once("--test")
    assert r.returncode == 0, r.stderr
    import json
    batch = json.loads(r.stdout)
    assert isinstance(batch, list) and len(batch) == 2
    merged = {}
    for obj in batch:
        assert isinstance(obj["ts"], int) and obj["ts"] > 1_600_000_000_000
        merged.update(obj["values"])
    assert merged == {"temperature": 21.5, "a": 1, "b": "x"}
    assert not a.state_dir.exists(), "--test must not create state"


def test_test_mode_reports_a_failing_source_and_exits_1(tmp_path):
    a = Agent(tmp_path, {
        "server": {"host": "192.0.2.1"},
        "sources": [
            {"name": "broken", "type": "file", "path": str(tmp_path / "missing"), "key": "k",
             "interval": "30s"},
            {"name": "fine", "type": "exec", "command": ["/bin/echo", '{"a": 1}'],
             "interval": "30s"}]})
    r = a.run_once("--test")
    assert r.returncode == 1
    assert "broken" in r.stderr
    assert '"a":1' in r.stdout.replace(" ", "")
