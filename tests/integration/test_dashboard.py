# ctest-labels: integration docs
"""The ThingsBoard dashboard shipped for the `system` source (dashboards/system.json,
docs/dashboard.md) is a well-formed ThingsBoard dashboard export and charts only keys the real
agent sends.

The keys come from the real agent: `tb-agent --test` with a system source listing every metric.
A machine without thermal zones (most VMs) has no `cpu_temperature`, so there the agent runs in
a private mount namespace with one simulated thermal zone over /sys/class/thermal."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent import build_dir, source_dir

DASHBOARD = source_dir() / "dashboards/system.json"
ALL_METRICS = ["cpu", "memory", "load", "uptime", "disk", "temperature", "swap", "network",
               "cpu_cores"]
# Server-side attributes ThingsBoard itself keeps for every device: a widget may show them.
THINGSBOARD_ATTRIBUTES = {"active", "lastActivityTime", "lastConnectTime", "lastDisconnectTime",
                          "inactivityAlarmTime"}
# Keys whose middle part is the user's (an interface, a mount, a core): compared by shape.
SHAPES = [
    (re.compile(r"^net_\w+?_((?:rx|tx)_(?:bytes|packets|errors|drops))$"), r"net_<if>_\1"),
    (re.compile(r"^disk_\w+?_(total|available|used_percent)$"), r"disk_<path>_\1"),
    (re.compile(r"^cpu\d+_usage$"), "cpu<n>_usage"),
]
DISK_KEYS = {"disk_total", "disk_available", "disk_used_percent"}


def shape(key):
    if key in DISK_KEYS:  # the disk of disk_path, not a disk_<path>_ one
        return key
    for pattern, replacement in SHAPES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def load_dashboard(path=DASHBOARD):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def data_keys(dashboard):
    """(widget id, key) of every data key of every datasource of every widget."""
    for wid, widget in dashboard["configuration"]["widgets"].items():
        for ds in widget["config"].get("datasources", []):
            for key in ds.get("dataKeys", []) + (ds.get("latestDataKeys") or []):
                yield wid, key


def structure_problems(dashboard):
    """What makes ThingsBoard's import refuse the file or show broken widgets; empty if none."""
    problems = []
    for field in ("title", "configuration"):
        if field not in dashboard:
            problems.append(f"no top-level {field!r}")
    if problems:
        return problems
    conf = dashboard["configuration"]
    for field in ("widgets", "states", "entityAliases", "timewindow", "settings"):
        if not isinstance(conf.get(field), dict):
            problems.append(f"configuration.{field} missing or not an object")
    if problems:
        return problems
    widgets, aliases = conf["widgets"], conf["entityAliases"]
    roots = [name for name, s in conf["states"].items() if s.get("root")]
    if len(roots) != 1:
        problems.append(f"{len(roots)} root states (want 1)")
    placed = set()
    for name, state in conf["states"].items():
        for layout_name, layout in state.get("layouts", {}).items():
            for wid, pos in layout.get("widgets", {}).items():
                placed.add(wid)
                if wid not in widgets:
                    problems.append(f"state {name} layout {layout_name} places unknown widget {wid}")
                if not all(isinstance(pos.get(f), (int, float)) for f in ("sizeX", "sizeY", "row", "col")):
                    problems.append(f"widget {wid} in {name}/{layout_name} lacks its position")
                elif pos["col"] + pos["sizeX"] > layout.get("gridSettings", {}).get("columns", 24):
                    problems.append(f"widget {wid} in {name}/{layout_name} runs off the grid")
    for wid, widget in widgets.items():
        if widget.get("id") != wid:
            problems.append(f"widget {wid} has id {widget.get('id')!r}")
        if wid not in placed:
            problems.append(f"widget {wid} is in no layout")
        if not re.fullmatch(r"system\.[\w.]+", widget.get("typeFullFqn", "")):
            problems.append(f"widget {wid} has no system widget type (typeFullFqn)")
        if widget.get("type") not in ("timeseries", "latest"):
            problems.append(f"widget {wid} has type {widget.get('type')!r}")
        datasources = widget.get("config", {}).get("datasources")
        if not datasources:
            problems.append(f"widget {wid} has no datasource")
        for ds in datasources or []:
            if ds.get("type") != "entity" or ds.get("entityAliasId") not in aliases:
                problems.append(f"widget {wid} uses unknown alias {ds.get('entityAliasId')!r}")
            if not ds.get("dataKeys"):
                problems.append(f"widget {wid} has a datasource without data keys")
    for aid, alias in aliases.items():
        if alias.get("id") != aid or not alias.get("alias") or "type" not in alias.get("filter", {}):
            problems.append(f"entity alias {aid} is incomplete")
    for wid, key in data_keys(dashboard):
        if key.get("type") not in ("timeseries", "attribute") or not key.get("name"):
            problems.append(f"widget {wid}: data key {key!r} is not a time series or attribute")
    return problems


def unknown_keys(dashboard, emitted):
    shapes = {shape(k) for k in emitted}
    unknown = set()
    for _, key in data_keys(dashboard):
        if key["type"] == "attribute":
            if key["name"] not in THINGSBOARD_ATTRIBUTES:
                unknown.add(key["name"])
        elif shape(key["name"]) not in shapes:
            unknown.add(key["name"])
    return unknown


@pytest.fixture(scope="module")
def emitted_keys(tmp_path_factory):
    """Every key one collection of a system source with every metric sends."""
    tmp = tmp_path_factory.mktemp("dashboard")
    config = tmp / "tb-agent.yaml"
    config.write_text(json.dumps({
        "server": {"host": "192.0.2.1"},  # never contacted
        "sources": [{"name": "host", "type": "system", "interval": "1m", "metrics": ALL_METRICS,
                     "interfaces": ["lo"], "disks": ["/"]}]}))
    cmd = [str(build_dir() / "src/tb-agent"), "--test", "--config", str(config),
           "--state-dir", str(tmp / "state")]
    zones = list(Path("/sys/class/thermal").glob("thermal_zone*"))
    if not zones:
        fake = tmp / "thermal/thermal_zone0"
        fake.mkdir(parents=True)
        (fake / "type").write_text("x86_pkg_temp\n")
        (fake / "temp").write_text("45000\n")
        assert shutil.which("unshare"), "unshare (util-linux) is needed on a machine without thermal zones"
        script = 'mount --bind "$1" /sys/class/thermal && shift && exec "$@"'
        cmd = ["unshare", "--mount", "--map-root-user", "sh", "-c", script, "sh",
               str(tmp / "thermal"), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    batch = json.loads(r.stdout)
    assert len(batch) == 1, batch
    keys = set(batch[0]["values"])
    assert "cpu_temperature" in keys and "net_lo_rx_bytes" in keys, keys
    return keys


def test_the_dashboard_is_a_well_formed_thingsboard_dashboard():
    assert structure_problems(load_dashboard()) == []


def test_the_dashboard_shows_only_keys_the_system_source_sends(emitted_keys):
    assert unknown_keys(load_dashboard(), emitted_keys) == set()


def test_the_dashboard_shows_every_metric():
    """Each metric of the source (but the optional per-core usage) has a widget."""
    shown = {shape(key["name"]) for _, key in data_keys(load_dashboard())}
    for prefix in ("cpu_usage", "memory_", "load_", "uptime", "disk_", "cpu_temperature",
                   "swap_", "net_<if>_"):
        assert any(k.startswith(prefix) for k in shown), prefix


def test_the_checks_catch_a_broken_dashboard(emitted_keys):
    """The checks above can fail: a key the source does not send, a widget the layout does not
    have, a layout entry without its widget, an alias nobody defined."""
    d = load_dashboard()
    wid, key = next(data_keys(d))
    key["name"] = "cpu_usage_percent"
    assert unknown_keys(d, emitted_keys) == {"cpu_usage_percent"}

    d = load_dashboard()
    layout = d["configuration"]["states"]["default"]["layouts"]["main"]["widgets"]
    layout["no-such-widget"] = {"sizeX": 4, "sizeY": 3, "row": 0, "col": 0}
    assert any("unknown widget no-such-widget" in p for p in structure_problems(d))

    d = load_dashboard()
    del d["configuration"]["states"]["default"]["layouts"]["main"]["widgets"][wid]
    assert any(f"widget {wid} is in no layout" in p for p in structure_problems(d))

    d = load_dashboard()
    d["configuration"]["entityAliases"].clear()
    assert any("unknown alias" in p for p in structure_problems(d))

    d = load_dashboard()
    del d["configuration"]
    assert structure_problems(d) == ["no top-level 'configuration'"]

