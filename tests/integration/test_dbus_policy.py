# ctest-labels: integration dbus
"""The real system bus policy (systemd/io.tbagent.Agent1.conf) loaded with <include> into a
private system-type dbus-daemon, so a broken policy fails here. The owner is
tb-dbus-status-fixture (the real StatusService with a fixed status) running as user tb-agent.

Checks: an unprivileged user reads every property, introspects and pings; its Flush/Reload are
denied; root's succeed and reach the handlers; an unprivileged user cannot own the name.
Needs root (creates users, switches to them), dbus-daemon, busctl and setpriv."""
import os
import pwd
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

SRC = Path(os.environ.get("TB_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD = Path(os.environ.get("TB_BUILD_DIR", SRC / "build"))
POLICY = SRC / "systemd" / "io.tbagent.Agent1.conf"
FIXTURE = BUILD / "tests" / "unit" / "dbus" / "tb-dbus-status-fixture"

NAME = "io.tbagent.Agent1"
PATH = "/io/tbagent/Agent1"
IFACE = "io.tbagent.Agent1"
PROPERTIES = {  # name -> the value busctl prints for the fixture's fixed status
    "State": 's "running"',
    "DeviceName": 's "fixture-device"',
    "Provisioned": "b true",
    "Server": 's "127.0.0.1:5683"',
    "QueuedReadings": "t 3",
    "SentReadings": "t 42",
    "DroppedReadings": "t 1",
    "LastSuccessTime": "t 1700000000000000",
    "LastError": 's ""',
    "Sources": 'a(sstttts) 1 "room" "file" 30000000 10 0 1700000000000000 ""',
    "StatusText": 's "running: 42 reading(s) delivered"',
}

# The default context of Debian's /usr/share/dbus-1/system.conf: connect, but no owning and no
# method calls unless a policy file punches a hole; replies and signals flow.
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <!-- As Debian's system.conf: root may monitor the bus (busctl monitor). -->
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users")


def tool(name):
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    assert path, f"{name} is required"
    return path


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def users():
    """The service user tb-agent (named by the policy) and a throwaway unprivileged user."""
    created = []
    if not user_exists("tb-agent"):
        subprocess.run([tool("useradd"), "--system", "--no-create-home", "--home-dir",
                        "/nonexistent", "--shell", "/usr/sbin/nologin", "tb-agent"], check=True)
        created.append("tb-agent")
    plain = f"tbpol{os.getpid()}"
    subprocess.run([tool("useradd"), "--no-create-home", "--home-dir", "/nonexistent", "--shell",
                    "/usr/sbin/nologin", plain], check=True)
    created.append(plain)
    yield {"service": "tb-agent", "plain": plain}
    for name in reversed(created):
        subprocess.run([tool("userdel"), name], check=False)


@pytest.fixture(scope="module")
def workdir():
    # Not pytest's tmp_path: its parents are 0700 root, and the test users must reach the socket
    # and the fixture binary.
    d = Path(tempfile.mkdtemp(prefix="tb-dbus-policy-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def read_line(proc, timeout, want=None):
    """The first stdout line (or the first one starting with `want`) within timeout, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            return None
        line = line.strip()
        if want is None or line.startswith(want):
            return line
    return None


@pytest.fixture(scope="module")
def bus(workdir, users):
    assert POLICY.exists()
    socket = workdir / "system_bus_socket"
    conf = workdir / "system.conf"
    conf.write_text(BUS_CONFIG.format(socket=socket, policy=POLICY))
    proc = subprocess.Popen([tool("dbus-daemon"), f"--config-file={conf}", "--nofork",
                             "--nopidfile", "--print-address=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = read_line(proc, 10)
    if not address:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"dbus-daemon refused the configuration (a broken policy?):\n{err}")
    yield address
    proc.terminate()
    proc.wait(timeout=10)


def as_user(user, argv, address):
    env = ["env", f"DBUS_SYSTEM_BUS_ADDRESS={address}"]
    if user == "root":
        return env + argv
    # setpriv execs in place (runuser stays as a parent that a kill would not reach through).
    return [tool("setpriv"), f"--reuid={user}", f"--regid={user}", "--init-groups", "--"] + env + argv


def fixture_binary(workdir):
    """A copy the service user can execute, wherever the build tree lives."""
    assert FIXTURE.exists(), f"{FIXTURE} is not built"
    copy = workdir / FIXTURE.name
    if not copy.exists():
        shutil.copy2(FIXTURE, copy)
        copy.chmod(0o755)
    return copy


@pytest.fixture(scope="module")
def owner(bus, users, workdir):
    """The status object, owned by tb-agent as in production."""
    proc = subprocess.Popen(as_user(users["service"], [str(fixture_binary(workdir))], bus),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = read_line(proc, 10, ("ready", "not owned"))
    if line != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"tb-agent could not own {NAME}: {line!r}\n{err}")
    yield proc
    proc.terminate()
    proc.wait(timeout=10)


def busctl(user, address, *args):
    return subprocess.run(as_user(user, [tool("busctl"), f"--address={address}"] + list(args),
                                  address),
                          capture_output=True, text=True, timeout=30)


def test_unprivileged_user_reads_every_property(bus, owner, users):
    for prop, value in PROPERTIES.items():
        r = busctl(users["plain"], bus, "get-property", NAME, PATH, IFACE, prop)
        assert r.returncode == 0, f"{prop}: {r.stderr}"
        assert r.stdout.strip() == value, prop


def test_unprivileged_user_introspects_and_pings(bus, owner, users):
    r = busctl(users["plain"], bus, "introspect", NAME, PATH)
    assert r.returncode == 0, r.stderr
    for member in list(PROPERTIES) + ["Flush", "Reload"]:
        assert f".{member} " in r.stdout, member
    r = busctl(users["plain"], bus, "call", NAME, PATH, "org.freedesktop.DBus.Peer", "Ping")
    assert r.returncode == 0, r.stderr


def test_unprivileged_user_cannot_call_methods(bus, owner, users):
    for method in ("Flush", "Reload"):
        r = busctl(users["plain"], bus, "call", NAME, PATH, IFACE, method)
        assert r.returncode != 0, method
        assert "Access denied" in r.stderr or "AccessDenied" in r.stderr, r.stderr
    # (A call without an interface field is denied too: dbus-daemon skips allow rules with
    # send_interface for it, so the default-context deny applies. busctl cannot send one.)

def test_root_calls_methods(bus, owner):
    r = busctl("root", bus, "call", NAME, PATH, IFACE, "Flush")
    assert r.returncode == 0, r.stderr
    assert read_line(owner, 10, "flush called") == "flush called"
    r = busctl("root", bus, "call", NAME, PATH, IFACE, "Reload")
    assert r.returncode == 0, r.stderr
    assert read_line(owner, 10, "reload called") == "reload called"


def test_service_user_cannot_call_methods(bus, owner, users):
    # Owning the name is all tb-agent needs; Flush/Reload stay root's.
    r = busctl(users["service"], bus, "call", NAME, PATH, IFACE, "Flush")
    assert r.returncode != 0


def test_unprivileged_user_cannot_own_the_name(bus, users, workdir):
    r = subprocess.run(as_user(users["plain"], [str(fixture_binary(workdir))], bus),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not owned" in r.stdout and "AccessDenied" in r.stdout, r.stdout
