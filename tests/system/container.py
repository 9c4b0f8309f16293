"""A booted Debian 12 systemd container for end-to-end tests of the installed package.

    root = ensure_root()                       # cached debootstrap root (made once, ~1-3 min)
    with Container(root, workdir, "tbsys-1234") as c:   # throwaway copy, booted with nspawn
        c.run(["systemctl", "is-active", "dbus"])
        c.run(["busctl", "..."], user="nobody")
        c.path("/etc/tb-agent.yaml").write_text(...)  # the root is a host directory

The container is booted with `systemd-nspawn -b --register=no --keep-unit --private-network`:
no machined or systemd is needed on the host (CI machines may run another PID 1), and with only
a loopback interface nothing inside can send traffic off the machine (the shipped placeholder
config names thingsboard.example.com). Commands run inside with `nsenter` into every namespace
of the container's PID 1, so they see its systemd, system bus, journal and loopback.

Standard library only.
"""

import fcntl
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

# What the tests need inside besides a minimal Debian: systemd as PID 1, the system bus, and the
# run-time libraries of tb-agent and tb-test-server (the package's Depends must already be there:
# the container has no network to fetch them). setpriv comes from util-linux (essential).
ROOT_PACKAGES = ["systemd", "systemd-sysv", "dbus", "libcoap3", "libsqlite3-0"]
ROOT_FORMAT = "1 " + ",".join(ROOT_PACKAGES)  # change it to force a new root
SUITE = "bookworm"
DEFAULT_CACHE = Path(os.environ.get("TB_SYSTEST_CACHE", "/var/cache/tb-agent-test"))

# Inside the container: a clean PATH and no pager or colours in systemctl/journalctl output.
INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "TERM": "dumb",
}


class ContainerError(RuntimeError):
    pass


def debian_mirror():
    """The Debian mirror this machine's apt uses (sources.list or deb822), else deb.debian.org."""
    candidates = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        candidates += sorted(d.iterdir())
    for f in candidates:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            for w in words:
                if w.startswith(("http://", "https://")) and w.rstrip("/").endswith("/debian"):
                    return w
    return "http://deb.debian.org/debian"


def ensure_root(cache_dir=DEFAULT_CACHE, log=None, extra_packages=()):
    """Return the pristine root, debootstrapping it first when missing or of another format.

    The pristine root is never booted; each test boots a copy. Made in a temporary directory and
    renamed, so an interrupted run leaves no half-made root behind. extra_packages are installed
    besides ROOT_PACKAGES (the footprint bench adds collectd-core); they are part of the format,
    so give such a root its own cache_dir."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Two test runs at once (two build directories) must not debootstrap over each other.
    with open(cache_dir / f"{SUITE}-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_root_locked(cache_dir, log, list(extra_packages))


def _ensure_root_locked(cache_dir, log, extra_packages):
    root = cache_dir / f"{SUITE}-root"
    stamp = cache_dir / f"{SUITE}-root.format"
    packages = ROOT_PACKAGES + extra_packages
    root_format = ROOT_FORMAT + "".join("," + p for p in extra_packages)
    if root.is_dir() and stamp.exists() and stamp.read_text().strip() == root_format:
        return root
    tmp = cache_dir / f"{SUITE}-root.tmp"
    for d in (tmp, root):
        if d.exists():
            shutil.rmtree(d)
    stamp.unlink(missing_ok=True)
    started = time.monotonic()
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        r = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(packages),
             SUITE, str(tmp), debian_mirror()],
            stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    finally:
        if log:
            out.close()
    if r.returncode != 0:
        raise ContainerError(f"debootstrap failed with {r.returncode}" +
                             (f"; see {log}" if log else ""))
    # Nothing in the root needs the downloaded .debs again.
    shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
    (tmp / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    # No console login prompt on the nspawn console, and a fixed host name.
    (tmp / "etc/hostname").write_text("tbsys\n")
    tmp.rename(root)
    stamp.write_text(root_format + "\n")
    (cache_dir / f"{SUITE}-root.seconds").write_text(f"{time.monotonic() - started:.0f}\n")
    return root


def _children(pid):
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _inner_pid1(outer_pid):
    """The container's PID 1 (its systemd) among the descendants of the nspawn process."""
    todo = [outer_pid]
    while todo:
        pid = todo.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                ids = line.split()[1:]
                if len(ids) > 1 and ids[-1] == "1":
                    return pid
        todo.extend(_children(pid))
    return None


class Container:
    """A throwaway copy of the pristine root, booted; removed again on exit."""

    def __init__(self, pristine, workdir, name, binds_ro=()):
        self.pristine = Path(pristine)
        self.workdir = Path(workdir)
        self.name = name
        self.root = self.workdir / "root"
        self.console_log = self.workdir / "console.log"
        self.binds_ro = list(binds_ro)
        self.proc = None
        self.pid1 = None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.boot()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc):
        self.destroy()

    def boot(self, timeout=120):
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.root.exists():
            shutil.rmtree(self.root)
        # A plain copy: ~300 MB, about a second from the page cache. (--ephemeral needs btrfs
        # to be fast and --overlay cannot cover the root directory.)
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.pristine), str(self.root)],
                       check=True)
        argv = ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
                "--private-network", "--console=read-only", "--link-journal=no",
                "--machine", self.name, "--directory", str(self.root)]
        for b in self.binds_ro:
            argv.append(f"--bind-ro={b}")
        self.console = open(self.console_log, "wb")
        # Its own process group, so teardown can kill nspawn and nothing else.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.console,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.pid1 is None:
            if self.proc.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode}: "
                                     f"{self.console_tail()}")
            if time.monotonic() > deadline:
                raise ContainerError(f"no PID 1 in the container: {self.console_tail()}")
            self.pid1 = _inner_pid1(self.proc.pid)
            if self.pid1 is None:
                time.sleep(0.1)
        # Booted = systemd finished its start-up transaction (running, or degraded when some
        # unrelated unit failed: those are listed in the error).
        state = ""
        while time.monotonic() < deadline:
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.3)
        failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
        raise ContainerError(f"container did not finish booting (state {state!r}, failed units "
                             f"{failed!r}): {self.console_tail()}")

    def destroy(self, timeout=60):
        if self.proc is not None:
            if self.proc.poll() is None and self.pid1 is not None:
                self.run(["systemctl", "poweroff"], check=False, timeout=30)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
            self.console.close()
        self.pid1 = None
        if self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def console_tail(self, lines=30):
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- inside -------------------------------------------------------------------------------
    def run(self, argv, user=None, check=True, timeout=60, input=None):
        """Run argv inside the container; returns CompletedProcess with text stdout/stderr.

        user: run as that user (setpriv, no PAM session) with its groups."""
        if self.pid1 is None:
            raise ContainerError("container is not running")
        if user is not None:
            uid = self.run(["id", "-u", user]).stdout.strip()
            gid = self.run(["id", "-g", user]).stdout.strip()
            argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    "--reset-env", "--"] + list(argv)
        full = ["nsenter", "--target", str(self.pid1), "--all", "--root", "--wd", "--"] + list(argv)
        r = subprocess.run(full, env=INNER_ENV, capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise ContainerError(f"{' '.join(argv)} exited with {r.returncode}\n"
                                 f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def path(self, inner):
        """The host path of a file inside the container (its root is a host directory)."""
        return self.root / str(inner).lstrip("/")

    def unit_property(self, unit, prop):
        return self.run(["systemctl", "show", "--value", "-p", prop, unit]).stdout.strip()

    def wait_for(self, what, predicate, timeout, interval=0.5, details=None):
        """Poll predicate() until it returns a true value; raise with `what` on timeout (and
        details(), e.g. a journal excerpt)."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = predicate()
            if last:
                return last
            if time.monotonic() > deadline:
                extra = f"\n{details()}" if details else ""
                raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
            time.sleep(interval)
