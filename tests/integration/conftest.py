import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent import Agent, build_dir  # noqa: E402
from tbserver import TbServer  # noqa: E402

PROVISION_KEY = "test-provision-key"
PROVISION_SECRET = "test-provision-secret-do-not-log"


def registered_server(tmp_path, device, token):
    """A started test server (allow_create) that already has `device` with access `token`; the
    caller stops it."""
    srv = TbServer(build_dir(), tmp_path, devices={device: token}, provision_key=PROVISION_KEY,
                   provision_secret=PROVISION_SECRET)
    srv.start()
    return srv


@pytest.fixture
def server(tmp_path):
    """A ThingsBoard-compatible CoAP server on loopback, allow_create strategy."""
    srv = TbServer(build_dir(), tmp_path, provision_key=PROVISION_KEY,
                   provision_secret=PROVISION_SECRET, strategy="allow_create")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def agents(tmp_path):
    """Factory for agents; every agent still running at the end is killed."""
    made = []

    def make(config, name="agent"):
        a = Agent(tmp_path, config, name)
        made.append(a)
        return a

    yield make
    for a in made:
        if a.running():
            a.proc.kill()
            a.proc.wait()
