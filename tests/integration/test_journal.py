# ctest-labels: integration
"""Logging to the journal: started by systemd (JOURNAL_STREAM names our stderr), tb-agent sends
native journal entries with PRIORITY=, SYSLOG_IDENTIFIER=, TB_SOURCE= and TB_STATE=, and never a
secret. The journal is a socket of the test's own at journald's fixed path."""
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from agent import server_config, wait_until
from conftest import PROVISION_KEY, PROVISION_SECRET

JOURNAL_DIR = Path("/run/systemd/journal")
JOURNAL_SOCKET = JOURNAL_DIR / "socket"


def parse_native(data):
    """journald's native protocol: KEY=VALUE lines, or KEY\\n<le64 size><bytes>\\n."""
    fields = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            fields[k.decode()] = v.decode(errors="replace")
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            fields[line.decode()] = data[nl + 9:nl + 9 + size].decode(errors="replace")
            i = nl + 9 + size + 1
    return fields


@pytest.fixture
def journal():
    if os.geteuid() != 0:
        pytest.skip("needs root to bind journald's socket path")
    if JOURNAL_SOCKET.exists():
        pytest.skip("a real journald is running here")
    made_dir = not JOURNAL_DIR.exists()
    JOURNAL_DIR.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(JOURNAL_SOCKET))
    sock.settimeout(0.2)
    entries = []
    stop = threading.Event()

    def run():
        while not stop.is_set():
            try:
                entries.append(parse_native(sock.recv(1 << 20)))
            except socket.timeout:
                continue

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield entries
    stop.set()
    t.join()
    sock.close()
    JOURNAL_SOCKET.unlink()
    if made_dir:
        JOURNAL_DIR.rmdir()


def test_entries_carry_priority_and_structured_fields(server, agents, tmp_path, journal):
    good = tmp_path / "good"
    good.write_text("1\n")
    agent = agents({
        "server": server_config(server),
        "device": {"name": "journal-1"},
        "provisioning": {"key": PROVISION_KEY, "secret": PROVISION_SECRET},
        "sources": [{"name": "broken", "type": "file", "path": str(tmp_path / "missing"),
                     "key": "k", "interval": "200ms"},
                    {"name": "fine", "type": "file", "path": str(good), "key": "g",
                     "interval": "200ms"}],
        "delivery": {"backoff_initial": "100ms", "backoff_max": "300ms"},
    })
    # What systemd does: stderr is a stream to journald and JOURNAL_STREAM names it.
    agent.log_path.touch()
    st = os.stat(agent.log_path)
    agent.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, log_level="info",
                log_target="auto")
    wait_until(lambda: any(e.get("TB_STATE") == "running" for e in journal),
               what="a TB_STATE=running entry")
    server.command("fail-all 5.00")
    wait_until(lambda: any(e.get("TB_STATE") == "retrying" for e in journal),
               what="a TB_STATE=retrying entry")
    server.command("fail-all off")
    assert agent.stop() == 0
    time.sleep(0.3)

    assert all(e.get("SYSLOG_IDENTIFIER") == "tb-agent" for e in journal)
    retrying = next(e for e in journal if e.get("TB_STATE") == "retrying")
    assert retrying["PRIORITY"] == "4"  # LOG_WARNING
    source_errors = [e for e in journal if e.get("TB_SOURCE") == "broken"]
    assert source_errors and source_errors[0]["PRIORITY"] in ("3", "4")
    assert "missing" in source_errors[0]["MESSAGE"]
    # Everything went to the journal, nothing to the stderr stream.
    assert agent.log() == ""
    creds = agent.credentials()
    for e in journal:
        text = " ".join(e.values())
        assert PROVISION_SECRET not in text
        assert creds["credentialsValue"] not in text
