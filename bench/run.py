#!/usr/bin/env python3
"""The comparison bench of issue 13, run by scripts/bench.sh (which builds in Release first).

Every alternative runs in the same run against the same sink (tb-test-server in its recording
mode with --record /dev/null), several times; the table shows medians and the spread. Prints a
markdown table, writes bench-results/results.{markdown,json} and PNG plots (with python3-matplotlib).

    bench/run.py --build build-bench [--runs 3] [--quick] [--only throughput,distance,...]

Sections: throughput (loopback), distance (through tests/tools/udp_proxy.py), footprint (beside
collectd when it is installed), booted (the footprint again as services on a booted systemd
container, needs root and systemd-nspawn), idle (wake-ups), ready (start to READY=1), size, scaling.
Standard library only, apart from the optional plots.
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent
TOKEN = "BENCHTOKEN"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- helpers ------------------------------------------------------------------------------

def median_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(v, unit="", digits=0):
    if v is None:
        return "–"
    if isinstance(v, float) and digits:
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,.0f}{unit}"


def cell(values, unit="", digits=0):
    m, lo, hi = median_spread(values)
    if m is None:
        return "–"
    if len([v for v in values if v is not None]) == 1 or lo == hi:
        return fmt(m, unit, digits)
    return f"{fmt(m, unit, digits)} ({fmt(lo, '', digits)}–{fmt(hi, '', digits)})"


class Sink:
    """tb-test-server recording nothing: the same sink for every alternative."""

    def __init__(self, build, workdir):
        self.dir = Path(tempfile.mkdtemp(prefix="sink-", dir=workdir))
        self.proc = subprocess.Popen(
            [str(build / "tests/server/tb-test-server"), "--port", "0", "--quiet", "--state",
             str(self.dir / "state.json"), "--record", "/dev/null", "--device",
             f"bench={TOKEN}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline().split()[-1])

    def stats(self):
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def read_proc(path):
    with open(path) as f:
        return f.read()


# Each takes how to read a /proc file: the host's (read_proc), or one inside the booted container.
def proc_rollup(pid, read=read_proc):
    """RSS, PSS, private (KiB) of a process."""
    out = {}
    try:
        text = read(f"/proc/{pid}/smaps_rollup")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":"):
            out[parts[0][:-1]] = int(parts[1])
    return {"rss": out.get("Rss", 0), "pss": out.get("Pss", 0),
            "private": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)}


def proc_cpu_s(pid, read=read_proc):
    fields = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_switches(pid, read=read_proc):
    return sum(int(line.split()[1]) for line in read(f"/proc/{pid}/status").splitlines()
               if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))


def agent_dir(workdir, port, sources_yaml, extra=""):
    d = Path(tempfile.mkdtemp(prefix="agent-", dir=workdir))
    (d / "credentials.json").write_text(json.dumps(
        {"credentialsType": "ACCESS_TOKEN", "credentialsValue": TOKEN, "deviceName": "bench"}))
    (d / "agent.yaml").write_text(
        f"server:\n  host: 127.0.0.1\n  port: {port}\ndevice:\n  name: bench\n"
        f"state_dir: {d}\nsources:\n{sources_yaml}dbus:\n  bus: none\n"
        f"logging:\n  level: warning\n{extra}")
    return d


def file_sources(d, n, interval):
    out = ""
    for i in range(n):
        p = d / f"value{i}"
        p.write_text(f"{20 + i}.5\n")
        out += (f"  - name: f{i}\n    type: file\n    path: {p}\n    key: t{i}\n"
                f"    interval: {interval}\n")
    return out


def start_agent(build, d, env=None):
    e = dict(os.environ)
    e.pop("NOTIFY_SOCKET", None)
    e.update(env or {})
    return subprocess.Popen([str(build / "src/tb-agent"), "--config", str(d / "agent.yaml")],
                            env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def watch(pid, seconds, read=read_proc, sample_every=2.0):
    """CPU % of one core, wake-ups (context switches) per minute, and memory averaged over the
    window (sampled every `sample_every` s): what a process holds over time, not at one moment
    that may fall before or after a periodic piece of work."""
    cpu0, sw0, t0 = proc_cpu_s(pid, read), proc_switches(pid, read), time.monotonic()
    samples = []
    while True:
        left = t0 + seconds - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(sample_every, left))
        mem = proc_rollup(pid, read)
        if mem:
            samples.append(mem)
    cpu1, sw1, t1 = proc_cpu_s(pid, read), proc_switches(pid, read), time.monotonic()
    mem = {k: round(sum(m[k] for m in samples) / len(samples)) for k in samples[0]} if samples else {}
    return {"cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "wakeups_per_min": 60 * (sw1 - sw0) / (t1 - t0), **mem}


# ---- sections -----------------------------------------------------------------------------

def drain(build, args, extra=()):
    """One tb-bench-drain run of the real agent; its figures, or None."""
    cmd = [str(build / "bench/tb-bench-drain"), "--only", "agent", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    m = re.search(r"agent: (\d+) readings in ([\d.]+) s wall = (\d+) readings/s, ([\d.]+) CPU s, "
                  r"peak RSS ([\d.]+) MiB", r.stdout)
    q = re.search(r"agent: (\d+) requests", r.stdout)
    sc = re.search(r"the server used ([\d.]+) CPU s", r.stdout)
    if r.returncode != 0 or not m:
        print(f"  drain {' '.join(extra)} failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    wall = float(m.group(2))
    return {"readings_s": float(m.group(3)), "requests_s": int(q.group(1)) / wall if q else None,
            "cpu_s": float(m.group(4)), "rss_mib": float(m.group(5)), "wall_s": wall,
            "server_cpu_s": float(sc.group(1)) if sc else None}


def client_run(cmd, timeout=600):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r"requests (\d+) ok (\d+) seconds ([\d.]+)", r.stdout)
    if not m or m.group(1) != m.group(2):
        print(f"  {cmd[0]} failed: {r.stdout.strip()[-200:]} {r.stderr.strip()[-200:]}",
              file=sys.stderr)
        return None
    return int(m.group(1)) / float(m.group(3))


def coap_client_loop(port, n):
    client = shutil.which("coap-client-notls") or shutil.which("coap-client")
    if not client:
        return None
    script = (f'for i in $(seq {n}); do {client} -m post -e "[{{\\"ts\\":$((1700000000000+i)),'
              f'\\"values\\":{{\\"v\\":$i.5}}}}]" coap://127.0.0.1:{port}/api/v1/{TOKEN}/telemetry'
              ' >/dev/null || exit 1; done')
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", script], capture_output=True, timeout=600)
    return n / (time.monotonic() - t0) if r.returncode == 0 else None


def throughput(build, args, work, results):
    runs, res = args.runs, {}
    n_drain = args.readings
    res["a"] = [drain(build, args, ["--readings", str(n_drain)]) for _ in range(runs)]
    res["a1"] = [drain(build, args, ["--readings", str(n_drain), "--max-in-flight", "1"])
                 for _ in range(runs)]
    # Node's `coap` package (npm) would be another (b); the bench installs nothing from npm, so it
    # is only noted whether it is there.
    node = shutil.which("node")
    if not node or subprocess.run([node, "-e", "require('coap')"], capture_output=True).returncode:
        print("  node's coap package is not installed: (b) is the Python stdlib client only",
              file=sys.stderr)
    sink = Sink(build, work)
    try:
        res["b"] = [client_run([sys.executable, str(SRC / "bench/script_client.py"),
                                str(sink.port), TOKEN, str(args.script_n)]) for _ in range(runs)]
        res["c"] = [coap_client_loop(sink.port, args.loop_n) for _ in range(runs)]
        res["d"] = [client_run([str(build / "bench/tb-bench-coap-ceiling"), str(sink.port), TOKEN,
                                str(args.ceiling_n)]) for _ in range(runs)]
    finally:
        sink.close()
    results["throughput"] = res


def distance(build, args, work, results):
    proxy = SRC / "tests/tools/udp_proxy.py"
    if not proxy.exists():
        print("  no tests/tools/udp_proxy.py: distance skipped", file=sys.stderr)
        return
    res = {}
    # One loop over every variant, with and without loss (delay each way = half the round trip).
    variants = (("proxy alone, no delay", 0, 0), ("20ms", 10, 0), ("100ms", 50, 0),
                ("20ms+1%", 10, 1), ("100ms+1%", 50, 1))
    for name, rtt, loss in variants:
        pargs = f"--delay {rtt} --loss {loss} --seed 1"
        n = args.distance_readings
        res[name] = [drain(build, args, ["--readings", str(n), "--proxy", pargs])
                     for _ in range(args.runs)]
        if loss == 0 and rtt > 0:
            res[name + " (1 in flight)"] = [
                drain(build, args, ["--readings", str(max(n // 20, 1000)), "--proxy", pargs,
                                    "--max-in-flight", "1"])]
    results["distance"] = res


def collectd_conf(d):
    conf = d / "collectd.conf"
    # A fixed host name: no DNS lookup at start (the booted container has no resolvable FQDN).
    conf.write_text(f"""Interval 1
Hostname "bench"
FQDNLookup false
BaseDir "{d}"
PIDFile "{d}/collectd.pid"
LoadPlugin cpu
LoadPlugin memory
LoadPlugin load
LoadPlugin interface
LoadPlugin df
LoadPlugin network
<Plugin network>
  Server "127.0.0.1" "25826"
</Plugin>
""")
    return conf


def footprint(build, args, work, results):
    res = {}
    sink = Sink(build, work)
    try:
        d = agent_dir(work, sink.port, "")
        (d / "agent.yaml").write_text((d / "agent.yaml").read_text().replace(
            "sources:\n", "sources:\n" + file_sources(d, 10, "1s")))
        res["tb-agent"] = []
        for _ in range(args.runs):
            p = start_agent(build, d)
            time.sleep(args.settle)
            res["tb-agent"].append(watch(p.pid, args.window))
            stop(p)
        collectd = shutil.which("collectd") or "/usr/sbin/collectd"
        if os.path.exists(collectd):
            conf = collectd_conf(d)
            res["collectd"] = []
            for _ in range(args.runs):
                p = subprocess.Popen([collectd, "-f", "-C", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(args.settle)
                res["collectd"].append(watch(p.pid, args.window))
                stop(p)
    finally:
        sink.close()
    results["footprint"] = res


def booted(build, args, work, results):
    """The footprint section again, inside a booted Debian 12 container (tests/system/container.py)
    with systemd as PID 1 and the system bus: the host tb-agent is made for. There, libsystemd and
    the compression and crypto libraries it pulls in are also mapped by systemd and dbus-daemon,
    so their clean pages are shared, as on a device; on a machine without systemd they are the
    agent's alone. Both run as transient services (systemd-run), log to the journal, and are read
    through /proc inside; same sources, plugins and windows as `footprint`."""
    if os.geteuid() != 0 or not shutil.which("systemd-nspawn") or not shutil.which("debootstrap"):
        print("booted: needs root, systemd-nspawn and debootstrap; skipped", file=sys.stderr)
        return
    sys.path.insert(0, str(SRC / "tests/system"))
    import container  # noqa: E402 (standard library only; made for the system test)

    root = container.ensure_root(Path(os.environ.get("TB_BENCH_ROOT_CACHE",
                                                     "/var/cache/tb-agent-bench")),
                                 log=Path(work) / "debootstrap.log",
                                 extra_packages=["collectd-core"])
    build = build.resolve()
    res = {}
    with container.Container(root, Path(work) / "booted", f"tbbench-{os.getpid()}",
                             binds_ro=[str(build)]) as c:
        # collectd-core's own service has no configuration (that is in package collectd): keep
        # it out of the way so only the measured instance runs.
        c.run(["systemctl", "disable", "--now", "collectd.service"], check=False)
        d = c.path("/bench")
        d.mkdir()
        (d / "agent.yaml").write_text(
            "server:\n  host: 127.0.0.1\n  port: 5683\ndevice:\n  name: bench\n"
            "state_dir: /bench\nsources:\n" +
            file_sources(d, 10, "1s").replace(str(d), "/bench") +
            "dbus:\n  bus: none\nlogging:\n  level: warning\n")
        (d / "credentials.json").write_text(json.dumps(
            {"credentialsType": "ACCESS_TOKEN", "credentialsValue": TOKEN, "deviceName": "bench"}))
        collectd_conf(d)
        (d / "collectd.conf").write_text((d / "collectd.conf").read_text().replace(str(d), "/bench"))
        c.run(["systemd-run", "--unit=bench-sink", str(build / "tests/server/tb-test-server"),
               "--port", "5683", "--quiet", "--state", "/bench/state.json", "--record",
               "/dev/null", "--device", f"bench={TOKEN}"])

        def inner_read(path):
            return c.run(["cat", path]).stdout

        services = {
            "tb-agent": ["-p", "Type=notify", str(build / "src/tb-agent"), "--config",
                         "/bench/agent.yaml"],
            "collectd": ["/usr/sbin/collectd", "-f", "-C", "/bench/collectd.conf"],
        }
        for name, argv in services.items():
            res[name] = []
            for i in range(args.runs):
                unit = f"bench-{name}-{i}"
                c.run(["systemd-run", f"--unit={unit}"] + argv, timeout=60)
                time.sleep(args.settle)
                if c.unit_property(unit, "ActiveState") != "active":
                    raise RuntimeError(f"{unit} is not running: " + c.run(
                        ["journalctl", "-u", unit, "--no-pager"], check=False).stdout[-2000:])
                res[name].append(watch(c.unit_property(unit, "MainPID"), args.window, inner_read))
                c.run(["systemctl", "stop", unit], check=False, timeout=60)
        # Who else maps the libraries the agent's private memory was spent on elsewhere.
        res["sharers"] = {lib: int(c.run(["sh", "-c", f"grep -l {lib} /proc/[0-9]*/maps | wc -l"],
                                         check=False).stdout.strip() or 0)
                          for lib in ("libsystemd.so.0", "liblzma", "libzstd", "libgcrypt")}
    results["booted"] = res


def idle(build, args, work, results):
    sink = Sink(build, work)
    try:
        d = agent_dir(work, sink.port, "")
        (d / "agent.yaml").write_text((d / "agent.yaml").read_text().replace(
            "sources:\n", "sources:\n" + file_sources(d, 1, "60s")))
        p = start_agent(build, d)
        time.sleep(3)
        results["idle"] = [watch(p.pid, args.idle_window)]
        stop(p)
    finally:
        sink.close()


def ready_once(build, d, env):
    sock_path = d / "notify.sock"
    if sock_path.exists():
        sock_path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(sock_path))
    s.settimeout(10)
    t0 = time.monotonic()
    p = start_agent(build, d, {**env, "NOTIFY_SOCKET": str(sock_path)})
    took = None
    try:
        while took is None:
            msg = s.recv(4096)
            if b"READY=1" in msg.split(b"\n"):
                took = (time.monotonic() - t0) * 1000
    except socket.timeout:
        pass
    finally:
        stop(p)
        s.close()
    return took


def ready(build, args, work, results):
    res = {}
    sink = Sink(build, work)
    bus = None
    try:
        d = agent_dir(work, sink.port, "")
        (d / "agent.yaml").write_text((d / "agent.yaml").read_text().replace(
            "sources:\n", "sources:\n" + file_sources(d, 1, "60s")))
        res["D-Bus off"] = [ready_once(build, d, {}) for _ in range(args.runs * 3)]
        if shutil.which("dbus-daemon"):
            bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--print-address=1",
                                    f"--address=unix:path={d}/bus"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            address = bus.stdout.readline().strip()
            (d / "agent.yaml").write_text((d / "agent.yaml").read_text().replace(
                "bus: none", "bus: session"))
            res["D-Bus on"] = [ready_once(build, d, {"DBUS_SESSION_BUS_ADDRESS": address})
                               for _ in range(args.runs * 3)]
    finally:
        stop(bus)
        sink.close()
    results["ready"] = res


def size(build, args, work, results):
    res = {}
    agent = build / "src/tb-agent"
    res["tb-agent binary"] = agent.stat().st_size
    stripped = Path(work) / "tb-agent.stripped"
    if shutil.which("strip"):
        subprocess.run(["strip", "-o", str(stripped), str(agent)], check=False)
        if stripped.exists():
            res["tb-agent binary, stripped"] = stripped.stat().st_size
    # scripts/build-packages.sh's package, else one CPack made in the bench's build directory
    # (cd build-bench && cpack -G DEB --config CPackConfig.cmake).
    debs = [d for where in (SRC / "build-pkg", build) if where.exists()
            for d in sorted(where.glob("tb-agent_*.deb"))]
    if debs:
        res["tb-agent .deb"] = debs[0].stat().st_size
        r = subprocess.run(["dpkg-deb", "-f", str(debs[0]), "Installed-Size"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            res["tb-agent installed"] = int(r.stdout.strip()) * 1024
    for pkg in ("collectd-core",):
        r = subprocess.run(["dpkg-query", "-W", "-f=${Installed-Size}", pkg],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            res[f"{pkg} installed"] = int(r.stdout.strip()) * 1024
    collectd = shutil.which("collectd") or "/usr/sbin/collectd"
    if os.path.exists(collectd):
        res["collectd binary"] = os.path.getsize(collectd)
    results["size"] = res


EXECD = r"""import sys, time
lines, keys = int(sys.argv[1]), int(sys.argv[2])
period, n, start = 1.0 / lines, 0, time.monotonic()
while True:
    n += 1
    sys.stdout.write("{" + ",".join('"k%d":%d.5' % (k, n % 1000) for k in range(keys)) + "}\n")
    sys.stdout.flush()
    time.sleep(max(0.0, start + n * period - time.monotonic()))
"""


def scaling(build, args, work, results):
    res = {"sources": {}, "rate": {}}
    sink = Sink(build, work)
    try:
        for n in (1, 10, 100):
            d = agent_dir(work, sink.port, "")
            (d / "agent.yaml").write_text((d / "agent.yaml").read_text().replace(
                "sources:\n", "sources:\n" + file_sources(d, n, "1s")))
            p = start_agent(build, d)
            time.sleep(3)
            res["sources"][n] = watch(p.pid, args.window)
            stop(p)
        script = Path(work) / "emit.py"
        script.write_text(EXECD)
        for rate in (10, 1000, 10000):
            lines = min(rate, 100)
            keys = rate // lines
            d = agent_dir(work, sink.port, "")
            src = (f"  - name: emit\n    type: execd\n    command: [\"{sys.executable}\", "
                   f"\"{script}\", \"{lines}\", \"{keys}\"]\n")
            (d / "agent.yaml").write_text((d / "agent.yaml").read_text().replace(
                "sources:\n", "sources:\n" + src))
            before = sink.stats().get("points", 0)
            p = start_agent(build, d)
            time.sleep(3)
            w = watch(p.pid, args.window)
            w["delivered_per_s"] = (sink.stats().get("points", 0) - before) / (args.window + 3)
            res["rate"][rate] = w
            stop(p)
    finally:
        sink.close()
    results["scaling"] = res


# ---- report -------------------------------------------------------------------------------

def col(runs, key):
    return [r[key] if r else None for r in runs]


def report(results, machine):
    out = ["# tb-agent bench", "", f"Machine: {machine}", ""]
    t = results.get("throughput")
    if t:
        a = col(t["a"], "readings_s")
        b, c, d = t["b"], t["c"], t["d"]
        am, bm, cm, dm = (median_spread(x)[0] for x in (a, b, c, d))
        aq = median_spread(col(t["a"], "requests_s"))[0]
        out += ["## Throughput on loopback (same sink)", "",
                "| alternative | readings/s | requests/s | vs |", "| --- | --- | --- | --- |",
                f"| (a) tb-agent drain, 100,000 readings | {cell(a)} | "
                f"{cell(col(t['a'], 'requests_s'))} | |",
                f"| (a) same, max_in_flight 1 | {cell(col(t['a1'], 'readings_s'))} | "
                f"{cell(col(t['a1'], 'requests_s'))} | |",
                f"| (b) Python script, one CON per reading | {cell(b)} | {cell(b)} | "
                f"(a) is {fmt(am / bm if am and bm else None)}× |",
                f"| (c) shell loop of coap-client | {cell(c)} | {cell(c)} | "
                f"(a) is {fmt(am / cm if am and cm else None)}× |",
                f"| (d) minimal libcoap client, back-to-back CONs | {cell(d)} | {cell(d)} | "
                f"(a)'s requests/s are {fmt(100 * aq / dm if aq and dm else None)} % |", "",
                f"CPU s of the agent's drain: {cell(col(t['a'], 'cpu_s'), '', 2)} (the sink's: "
                f"{cell(col(t['a'], 'server_cpu_s'), '', 2)}); peak RSS "
                f"{cell(col(t['a'], 'rss_mib'), ' MiB', 1)}.", ""]
    dist = results.get("distance")
    if dist:
        out += ["## At a distance (tests/tools/udp_proxy.py)", "",
                "| round trip, loss | readings/s | requests/s | agent CPU s |",
                "| --- | --- | --- | --- |"]
        for k, runs in dist.items():
            out.append(f"| {k} | {cell(col(runs, 'readings_s'))} | "
                       f"{cell(col(runs, 'requests_s'))} | {cell(col(runs, 'cpu_s'), '', 2)} |")
        out.append("")
    f = results.get("footprint")
    if f:
        out += ["## Footprint: 10 sources at 1 s (collectd: cpu, memory, load, interface, df, "
                "network at 1 s)", "", "Memory: the mean of samples every 2 s over the window.", "",
                "| | RSS KiB | PSS KiB | private KiB | CPU % of a core |",
                "| --- | --- | --- | --- | --- |"]
        for k, runs in f.items():
            out.append(f"| {k} | {cell(col(runs, 'rss'))} | {cell(col(runs, 'pss'))} | "
                       f"{cell(col(runs, 'private'))} | {cell(col(runs, 'cpu_pct'), '', 2)} |")
        out.append("")
    bt = results.get("booted")
    if bt:
        out += ["## The same, on a booted systemd host (a Debian 12 container, both as services)",
                "", "| | RSS KiB | PSS KiB | private KiB | CPU % of a core |",
                "| --- | --- | --- | --- | --- |"]
        for k, runs in bt.items():
            if k == "sharers":
                continue
            out.append(f"| {k} | {cell(col(runs, 'rss'))} | {cell(col(runs, 'pss'))} | "
                       f"{cell(col(runs, 'private'))} | {cell(col(runs, 'cpu_pct'), '', 2)} |")
        out += ["", "Processes mapping each library there (with the agent stopped): " + ", ".join(
            f"{k} {v}" for k, v in bt.get("sharers", {}).items()) + ".", ""]
    i = results.get("idle")
    if i:
        out += [f"Idle, one source at 60 s: {cell(col(i, 'wakeups_per_min'), '', 1)} wake-ups "
                "(context switches) a minute.", ""]
    r = results.get("ready")
    if r:
        out += ["Start to READY=1 with stored credentials: " + "; ".join(
            f"{k} {cell(v, ' ms', 1)}" for k, v in r.items()) + ".", ""]
    s = results.get("size")
    if s:
        out += ["## Size", "", "| | bytes |", "| --- | --- |"]
        out += [f"| {k} | {v:,} |" for k, v in s.items()]
        out.append("")
    sc = results.get("scaling")
    if sc:
        out += ["## Scaling", "", "| work | CPU % | RSS KiB | PSS KiB | private KiB |",
                "| --- | --- | --- | --- | --- |"]
        for n, w in sc["sources"].items():
            out.append(f"| {n} file sources at 1 s | {w['cpu_pct']:.2f} | {w.get('rss')} | "
                       f"{w.get('pss')} | {w.get('private')} |")
        for n, w in sc["rate"].items():
            out.append(f"| {int(n):,} readings/s (execd; delivered "
                       f"{w.get('delivered_per_s', 0):,.0f}/s) | {w['cpu_pct']:.2f} | "
                       f"{w.get('rss')} | {w.get('pss')} | {w.get('private')} |")
        out.append("")
    return "\n".join(out)


def plots(results, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plots (apt install python3-matplotlib)", file=sys.stderr)
        return
    t = results.get("throughput")
    if t:
        names = ["(a) tb-agent", "(a) 1 in flight", "(b) script", "(c) coap-client loop",
                 "(d) libcoap ceiling"]
        vals = [median_spread(col(t["a"], "readings_s"))[0],
                median_spread(col(t["a1"], "readings_s"))[0]] + [
            median_spread(t[k])[0] for k in ("b", "c", "d")]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(names, [v or 0 for v in vals])
        ax.set_yscale("log")
        ax.set_ylabel("readings/s (log)")
        ax.set_title("Throughput on loopback, same sink")
        fig.tight_layout()
        fig.savefig(outdir / "throughput.png")
    dist = results.get("distance")
    if dist:
        fig, ax = plt.subplots(figsize=(8, 4))
        ks = list(dist)
        ax.bar(ks, [median_spread(col(dist[k], "readings_s"))[0] or 0 for k in ks])
        ax.set_yscale("log")
        ax.set_ylabel("readings/s (log)")
        ax.set_title("Drain at a distance")
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
        fig.tight_layout()
        fig.savefig(outdir / "distance.png")
    sc = results.get("scaling")
    if sc:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in ((axes[0], "sources", "file sources at 1 s"),
                               (axes[1], "rate", "readings/s")):
            xs = [int(x) for x in sc[key]]
            ax.plot(xs, [sc[key][k]["cpu_pct"] for k in sc[key]], "o-", label="CPU %")
            ax2 = ax.twinx()
            ax2.plot(xs, [sc[key][k].get("pss", 0) / 1024 for k in sc[key]], "s--", color="C1",
                     label="PSS MiB")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("CPU % of a core")
            ax2.set_ylabel("PSS MiB")
        fig.suptitle("Cost as work grows")
        fig.tight_layout()
        fig.savefig(outdir / "scaling.png")
    f = results.get("footprint")
    if f:
        fig, ax = plt.subplots(figsize=(7, 4))
        ks = list(f)
        width = 0.25
        for i, m in enumerate(("rss", "pss", "private")):
            ax.bar([x + i * width for x in range(len(ks))],
                   [(median_spread(col(f[k], m))[0] or 0) / 1024 for k in ks], width, label=m)
        ax.set_xticks([x + width for x in range(len(ks))], ks)
        ax.set_ylabel("MiB")
        ax.legend()
        ax.set_title("Memory, 10 sources at 1 s")
        fig.tight_layout()
        fig.savefig(outdir / "footprint.png")


def machine_note():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = open("/proc/loadavg").read().split()[:3]
    return (f"{platform.node()}, {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
            f"load average at start {' '.join(load)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(SRC / "build-bench"))
    ap.add_argument("--out", default=str(SRC / "bench-results"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="short windows, smaller counts")
    ap.add_argument("--only",
                    default="throughput,distance,footprint,booted,idle,ready,size,scaling")
    args = ap.parse_args()
    args.readings = 100000
    args.distance_readings = 50000
    args.script_n, args.loop_n, args.ceiling_n = 2000, 200, 20000
    args.window, args.idle_window = 30, 120
    # Footprint windows start past tb-agent's start-up (it gives start-up's memory back after
    # 10 s, util/memory.hpp) and end past its once-a-minute work, so the memory read at the end
    # is that of the running agent; collectd gets the same.
    args.settle = 35
    if args.quick:
        args.distance_readings, args.script_n, args.loop_n, args.ceiling_n = 20000, 500, 50, 5000
        args.window, args.idle_window = 10, 30
    build, out = Path(args.build), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_note()
    results = {"machine": machine}
    sections = {"throughput": throughput, "distance": distance, "footprint": footprint,
                "booted": booted, "idle": idle, "ready": ready, "size": size, "scaling": scaling}
    with tempfile.TemporaryDirectory(prefix="tb-bench-") as work:
        for name in args.only.split(","):
            print(f"== {name}", file=sys.stderr)
            sections[name](build, args, work, results)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    text = report(results, machine)
    (out / "results.markdown").write_text(text + "\n")
    plots(results, out)
    print(text)


if __name__ == "__main__":
    main()
