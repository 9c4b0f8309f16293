"""Drive tb-test-server (tests/server) from Python tests. Standard library only.

    with TbServer(build_dir, tmp_path, provision_key="pk", provision_secret="ps",
                  devices={"pump-7": "tok7"}) as srv:
        ...                       # point the agent at coap://127.0.0.1:{srv.port}
        srv.command("fail 2 5.00")
        srv.points("pump-7")      # -> [Point(key, ts, value, device), ...]

See docs/test-server.md for the control protocol and the record format.
"""

import json
import os
import select
import subprocess
import time
from collections import namedtuple
from pathlib import Path

# One stored telemetry point. Indexable like the record format's [key, ts, value] (p[0] is the
# key), with the device as a fourth field for points() over all devices.
Point = namedtuple("Point", ["key", "ts", "value", "device"])


class TbServerError(RuntimeError):
    pass


class TbServer:
    """One tb-test-server process; restart() keeps the port and the --state file."""

    def __init__(self, build_dir=None, tmp_path=None, *, port=0, bind="127.0.0.1",
                 strategy="allow_create", provision_key=None, provision_secret=None,
                 devices=None, x509_devices=None, framing=None, strict_size=False, verbose=False,
                 quiet=True, extra_args=(), name="tbserver"):
        build_dir = build_dir or os.environ.get("TB_BUILD_DIR")
        if not build_dir:
            raise TbServerError("build_dir not given and TB_BUILD_DIR not set")
        self.binary = Path(build_dir) / "tests" / "server" / "tb-test-server"
        if tmp_path is None:
            import tempfile
            tmp_path = tempfile.mkdtemp(prefix="tbserver-")
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.dir / f"{name}.state.json"
        self.record_file = self.dir / f"{name}.record.jsonl"
        self.stderr_file = self.dir / f"{name}.stderr.log"
        self.port = port
        self.bind = bind
        # Everything that becomes a command-line option; tests may change it between stop() and
        # start(), e.g. options["devices"] = {"pump-7b": "TOKEN"} to add a device.
        self.options = dict(strategy=strategy, provision_key=provision_key,
                            provision_secret=provision_secret, framing=framing,
                            devices=dict(devices or {}),
                            x509_devices=dict(x509_devices or {}), strict_size=strict_size,
                            verbose=verbose, quiet=quiet, extra_args=list(extra_args))
        self.proc = None
        self._buf = b""

    # -- lifecycle ----------------------------------------------------------------------------
    def _argv(self):
        argv = [str(self.binary), "--port", str(self.port), "--bind", self.bind,
                "--state", str(self.state_file), "--record", str(self.record_file),
                "--strategy", self.options["strategy"]]
        if self.options["provision_key"] is not None:
            argv += ["--provision-key", self.options["provision_key"]]
        if self.options["provision_secret"] is not None:
            argv += ["--provision-secret", self.options["provision_secret"]]
        if self.options["framing"]:
            argv += ["--framing", self.options["framing"]]
        for name, token in (self.options["devices"] or {}).items():
            argv += ["--device", f"{name}={token}"]
        for name, pem_file in self.options["x509_devices"].items():
            argv += ["--device-x509", f"{name}={pem_file}"]
        if self.options["strict_size"]:
            argv.append("--strict-size")
        if self.options["verbose"]:
            argv.append("--verbose")
        elif self.options["quiet"]:
            argv.append("--quiet")
        return argv + list(self.options["extra_args"])

    def start(self, timeout=10.0):
        if self.proc is not None:
            raise TbServerError("already started")
        if not self.binary.exists():
            raise TbServerError(f"{self.binary} not built")
        self._buf = b""
        with open(self.stderr_file, "ab") as err:
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err)
        line = self._readline(timeout)
        if not line.startswith("listening on "):
            self.stop()
            raise TbServerError(f"unexpected first line {line!r}; stderr: {self.stderr()}")
        self.port = int(line.split()[-1])
        return self

    def stop(self, timeout=5.0):
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            try:
                proc.stdin.write(b"quit\n")
                proc.stdin.flush()
                proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def restart(self):
        """Stop and start again on the same port with the same --state file."""
        self.stop()
        self.start()
        return self

    def kill(self):
        """Hard stop (SIGKILL), like a crash; the state file was written atomically."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- control ------------------------------------------------------------------------------
    def _readline(self, timeout):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TbServerError("timeout waiting for tb-test-server output")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise TbServerError(f"tb-test-server exited; stderr: {self.stderr()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def command(self, line, timeout=5.0):
        """Send one control line; return the reply ("ok", "error ...", or JSON for stats)."""
        if self.proc is None:
            raise TbServerError("not running")
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._readline(timeout)

    def check(self, line):
        reply = self.command(line)
        if reply != "ok":
            raise TbServerError(f"{line!r} -> {reply!r}")

    def stats(self):
        return json.loads(self.command("stats"))

    def send_rpc(self, device, method, timeout_ms=10000, params=None):
        """A server-side RPC (docs/test-server.md "Observe and RPC"); returns its id."""
        line = f"rpc {device} {method} {int(timeout_ms)}"
        if params is not None:
            line += " " + json.dumps(params)
        reply = self.command(line)
        if not reply.startswith("ok "):
            raise TbServerError(f"{line!r} -> {reply!r}")
        return int(reply.split()[1])

    def rpcs(self, device):
        return json.loads(self.command(f"rpcs {device}"))

    def observers(self, device):
        return json.loads(self.command(f"observers {device}"))

    # -- observations -------------------------------------------------------------------------
    def records(self):
        """Every request as recorded, oldest first (one dict per line of --record)."""
        if not self.record_file.exists():
            return []
        with open(self.record_file, encoding="utf-8") as f:
            text = f.read()
        # The server may be half-way through writing its newest line (a long record leaves its
        # stream buffer in more than one write): only lines that end in a newline are complete.
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def state(self):
        if not self.state_file.exists():
            return {"devices": {}}
        with open(self.state_file, encoding="utf-8") as f:
            return json.load(f)

    def points(self, device=None):
        """Stored telemetry points, oldest first; they survive restarts.

        Each is a Point(key, ts, value, device): p[0], p[1], p[2] are key, ts and value as in a
        record's "points" list."""
        # From the request record, which is written before each answer is sent (the state file
        # is saved at most every 100 ms); a point is stored when its request answered 2.01.
        out = []
        for r in self.records():
            if r.get("feature") != "telemetry" or r.get("code") != "2.01" or not r.get("points"):
                continue
            d = r.get("device")
            if device is not None and d != device:
                continue
            out.extend(Point(k, ts, v, d) for k, ts, v in r["points"])
        return out

    def hostile_records(self, switch=None):
        """Records of requests answered by a hostile switch ("block2 ...", "continue ..."), or
        only those of one switch, e.g. hostile_records("block2 endless")."""
        return [r for r in self.records()
                if "hostile" in r and (switch is None or r["hostile"] == switch)]

    def devices(self):
        """Device name -> access token (None once revoked)."""
        return {name: d["token"] for name, d in self.state()["devices"].items()}

    def attributes(self, device):
        d = self.state()["devices"][device]
        return {"client": d["client"], "shared": d["shared"]}

    def stderr(self):
        try:
            return self.stderr_file.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, predicate, timeout=10.0, interval=0.05):
        """Poll predicate() until truthy; returns its value or raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TbServerError("condition not met in time")
            time.sleep(interval)
