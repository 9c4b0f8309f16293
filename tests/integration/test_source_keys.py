# ctest-labels: integration
"""Source types own their keys (issue 10), with the real agent:

* a reload of every key of every type takes effect: the source whose key changed, and only it,
  is restarted with its new settings (a renamed one is removed and added), while the readings
  queued before stay queued, untouched (the server is unreachable, so nothing is delivered);
  the keys come from the declaration tables in src/sources/, so a key added later without a
  value here fails;
* `--test` shows one round of every source type, plugins included, and `--check-config` loads
  (and unloads) every plugin (issue 10 item 6)."""
import json
import re
import shutil
import signal
import sqlite3

import pytest

import declarations
from agent import Agent, build_dir, wait_until

TEST_PLUGINS = build_dir() / "tests" / "unit" / "sources" / "plugins"
CLOSED_PORT = 9  # discard: nothing listens on loopback, every delivery fails and readings queue


def plugin_so(name):
    path = TEST_PLUGINS / f"{name}.so"
    if not path.exists():
        pytest.skip(f"{path} is not built (target tb_test_plugin_{name})")
    return str(path)


def sources(tmp_path):
    """One source of every type, and for each of its keys a value before and after a change."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("3\n")
    b.write_text("4\n")
    other_dir = tmp_path / "wd"
    other_dir.mkdir()
    plugin_copy = tmp_path / "plugins" / "good.so"
    plugin_copy.parent.mkdir()
    shutil.copy(plugin_so("good"), plugin_copy)

    def json_line(key, value):
        return f"printf '{{\"{key}\": {value}}}\\n'"

    return {
        "file": ({"path": (str(a), str(b)), "key": ("v", "w"), "scale": (1, 2),
                  "offset": (0, 1), "interval": ("1s", "2s")}),
        "exec": ({"command": (["/bin/sh", "-c", json_line("x", 1)],
                              ["/bin/sh", "-c", json_line("x", 2)]),
                  "timeout": ("900ms", "1s"), "env": ({"A": "1"}, {"A": "2"}),
                  "working_directory": ("/", str(other_dir)),
                  "interval": ("1s", "2s")}),
        "system": ({"metrics": (["load"], ["memory"]), "disk_path": ("/", str(tmp_path)),
                    "disks": (["/"], [str(tmp_path)]), "interfaces": (["lo"], ["eth*"]),
                    "exclude_interfaces": (["docker0"], ["veth*"]),
                    "interval": ("1s", "2s")}),
        "execd": ({"command": (["/bin/sh", "-c", f"while :; do {json_line('y', 1)}; sleep 0.2; done"],
                               ["/bin/sh", "-c", f"while :; do {json_line('y', 2)}; sleep 0.2; done"]),
                   "timeout": ("1s", "2s"), "env": ({"A": "1"}, {"A": "2"}),
                   "working_directory": ("/", str(other_dir))}),
        "plugin": ({"path": (plugin_so("good"), str(plugin_copy)), "timeout": ("500ms", "900ms"),
                    "options": ({"number": 1}, {"number": 2}), "interval": ("1s", "2s")}),
    }


def config_of(values, changed=None):
    """The config with every source at its "before" values, one key of one at its "after"."""
    srcs = []
    for type_name, keys in values.items():
        src = {"name": type_name, "type": type_name}
        for key, (before, after) in keys.items():
            src[key] = after if changed == (type_name, key) else before
        srcs.append(src)
    return {
        "server": {"host": "127.0.0.1", "port": CLOSED_PORT, "request_timeout": "1s"},
        "credentials": {"access_token": "t"},
        "sources": srcs,
        "delivery": {"flush_interval": "100ms", "backoff_initial": "5s", "backoff_max": "10s",
                     "shutdown_timeout": "0s"},
    }


def write(agent, cfg):
    """A new config for a running agent: its state_dir and bus as they were."""
    cfg["state_dir"] = str(agent.state_dir)
    cfg["dbus"] = {"bus": "none"}
    agent.write_config(cfg)


def queued_ts(state_dir):
    db = sqlite3.connect(f"file:{state_dir / 'queue.db'}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT ts FROM records")}
    finally:
        db.close()


def test_a_reload_of_every_key_of_every_type_takes_effect_and_keeps_the_queue(tmp_path):
    values = sources(tmp_path)
    declared = {t for t in declarations.types()}
    assert set(values) == declared, "every declared type needs values here"
    for type_name in declared:
        keys = {k.name for k in declarations.keys_of(type_name)} - {"name", "type"}
        assert set(values[type_name]) == keys, (
            f"{type_name}: every declared key needs a before/after value here")

    agent = Agent(tmp_path, config_of(values))
    agent.start(log_level="debug")
    try:
        for type_name in values:
            agent.wait_log(f"from '{type_name}'", timeout=30)  # every source has queued readings
        agent.send_signal(signal.SIGHUP)  # an unchanged file: nothing restarts
        agent.wait_log("configuration reloaded")
        log = agent.log()
        assert "changed: restarted" not in log and not re.search(r"source '[^']*' added", log), (
            log[-2000:])

        reloads = 1
        for type_name, keys in values.items():
            for key in keys:
                for changed in ((type_name, key), None):  # the change, then back
                    write(agent, config_of(values, changed))
                    agent.send_signal(signal.SIGHUP)
                    reloads += 1
                    wait_until(lambda: agent.log().count("configuration reloaded") == reloads
                               or "reload refused" in agent.log(),
                               what=f"reload {reloads} ({type_name}.{key})")
                    log = agent.log()
                    assert "reload refused" not in log, log[-3000:]
                    # Each of these reloads restarted one source, this one.
                    assert log.count("changed: restarted with its new settings") == reloads - 1, (
                        f"{type_name}.{key}:\n{log[-3000:]}")
                    assert log.count(f"source '{type_name}' changed: restarted") == (
                        2 * list(keys).index(key) + (1 if changed else 2)), f"{type_name}.{key}"
        assert "reload refused" not in agent.log()

        # A renamed source is another source: removed, and added under its new name.
        cfg = config_of(values)
        cfg["sources"][0]["name"] = "renamed"
        write(agent, cfg)
        agent.send_signal(signal.SIGHUP)
        agent.wait_log("source 'renamed' added")
        agent.wait_log("source 'file' removed")
        before = {int(ts) for ts in
                  re.findall(r"queued \d+ reading\(s\) from '\w+' ts=(\d+)", agent.log())}
    finally:
        agent.stop()
    assert before
    # Readings queued before, during and after the reloads are all still there.
    assert before <= queued_ts(agent.state_dir)


def test_changed_keys_are_used_by_the_restarted_source(tmp_path):
    """Takes effect, seen in the readings: the file source's key and scale, the exec source's
    env. (The queue is locked while the agent runs: it is read once the agent stopped.)"""
    values = sources(tmp_path)
    cfg = config_of(values)
    cfg["sources"] = [s for s in cfg["sources"] if s["type"] in ("file", "exec")]
    cfg["sources"][1]["command"] = ["/bin/sh", "-c", "printf '{\"a\": \"%s\"}' \"$A\""]
    agent = Agent(tmp_path, cfg)
    agent.start(log_level="debug")
    try:
        for name in ("file", "exec"):
            agent.wait_log(f"from '{name}'")
        cfg["sources"][0]["key"] = "w"
        cfg["sources"][0]["scale"] = 2
        cfg["sources"][1]["env"] = {"A": "2"}
        write(agent, cfg)
        agent.send_signal(signal.SIGHUP)
        agent.wait_log("configuration reloaded")
        def counts():
            return [agent.log().count(f"reading(s) from '{n}'") for n in ("file", "exec")]

        before = counts()
        wait_until(lambda: all(n > b for n, b in zip(counts(), before)),
                   what="readings after the reload")
    finally:
        agent.stop()
    queued = values_queued(agent)
    # 3 * scale 2 is a double (docs/sources.md, type: file).
    assert {'{"v":3}', '{"a":"1"}', '{"w":6.0}', '{"a":"2"}'} <= set(queued), queued


def values_queued(agent):
    """The values_json of every queued record."""
    db = sqlite3.connect(f"file:{agent.state_dir / 'queue.db'}?mode=ro", uri=True)
    try:
        return [r[0].replace(" ", "") for r in db.execute("SELECT values_json FROM records")]
    finally:
        db.close()


def test_test_mode_shows_one_round_of_every_type_and_check_config_loads_every_plugin(tmp_path):
    values = sources(tmp_path)
    cfg = config_of(values)
    cfg["sources"].append({"name": "broken", "type": "plugin", "path": plugin_so("create_fails")})
    a = Agent(tmp_path, cfg)
    r = a.run_once("--check-config")
    assert r.returncode == 78, r.stdout + r.stderr
    # Every plugin was loaded: the broken one's own create failed, the good one passed.
    assert "source 'broken': plugin source 'broken' (test): create failed" in r.stdout
    assert "source 'plugin'" not in r.stdout
    del cfg["sources"][-1]
    a.write_config(cfg)
    r = a.run_once("--check-config")
    assert r.returncode == 0 and r.stdout == "OK\n", r.stdout + r.stderr
    r = a.run_once("--test")
    assert r.returncode == 0, r.stderr
    batch = json.loads(r.stdout)
    assert len(batch) == len(values), batch  # one record per source, in config order
    by_value_keys = [set(record["values"]) for record in batch]
    assert by_value_keys[0] == {"v"}                      # file
    assert by_value_keys[1] == {"x"}                      # exec
    assert "load_1" in by_value_keys[2]                   # system, metrics: [load]
    assert by_value_keys[3] == {"y"}                      # execd: its first line
    assert {"count", "number"} <= by_value_keys[4]        # plugin
