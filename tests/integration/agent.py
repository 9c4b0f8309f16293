"""Drive a real tb-agent process for integration tests (stdlib only)."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path


def wait_until(predicate, timeout=15.0, interval=0.05, what="condition"):
    """Poll predicate() until it returns a truthy value; return it or raise AssertionError.
    `what` may be a callable: it is called at the timeout, so it can say what is still missing."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {said}")
        time.sleep(interval)


def build_dir():
    return Path(os.environ.get("TB_BUILD_DIR", Path(__file__).resolve().parents[2] / "build"))


def source_dir():
    return Path(os.environ.get("TB_SOURCE_DIR", Path(__file__).resolve().parents[2]))


class Agent:
    """One tb-agent with its own config file, state dir and log file.

    The config is written as JSON, which YAML 1.2 reads as-is.
    """

    def __init__(self, tmp_path, config, name="agent"):
        self.dir = Path(tmp_path) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.config_path = self.dir / "tb-agent.yaml"
        self.log_path = self.dir / "agent.log"
        self.binary = build_dir() / "src" / "tb-agent"
        self.proc = None
        self.config = config
        self.config.setdefault("state_dir", str(self.state_dir))
        self.config.setdefault("dbus", {"bus": "none"})
        self.write_config()

    def write_config(self, config=None):
        if config is not None:
            self.config = config
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")

    def start(self, *args, env=None, log_level="debug", log_target="stderr"):
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.pop("JOURNAL_STREAM", None)
        if env:
            full_env.update(env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "--config", str(self.config_path), f"--log-target={log_target}",
             f"--log-level={log_level}", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, env=full_env)
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Stop the agent; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agent did not stop within {timeout}s after {sig}")
        self._log.close()
        return code

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def wait_exit(self, timeout=15):
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, needle, timeout=15.0):
        return wait_until(lambda: needle in self.log(), timeout, what=f"log line {needle!r}\n--- log:\n{self.log()[-3000:]}")

    def credentials(self):
        p = self.state_dir / "credentials.json"
        return json.loads(p.read_text()) if p.exists() else None

    def run_once(self, *args, timeout=30):
        """Run tb-agent with extra args to completion (e.g. --check-config)."""
        return subprocess.run(
            [str(self.binary), "--config", str(self.config_path), "--log-target=stderr", *args],
            capture_output=True, text=True, timeout=timeout)


def server_config(server, **extra):
    cfg = {"host": "127.0.0.1", "port": server.port, "request_timeout": "3s"}
    cfg.update(extra)
    return cfg
