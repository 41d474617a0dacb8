"""LXD killed in the middle of a spawn, through the real hub: the spawn page
says which GPU server stopped answering and to try again (no raw LXD text,
no 500), the hub's log has LXD's detail, and once LXD is back the same spawn
succeeds: nothing half-made blocks it.

LXD is killed with SIGKILL, as a crash would; containers keep running (their
monitors are processes of their own) and ``setup/lxdhost.py up`` starts it
again, as after a crash.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests

from lxcspawner import naming
from tests.fixtures.lxd import REPO
from tests.integration.test_hub_spawn import SERVER, wait_ready

pytestmark = pytest.mark.lxd

USER = "olga"


def kill_lxd() -> None:
    """SIGKILL the daemon, as a crash would.  Where systemd runs LXD it
    would start a new one at once (Restart=on-failure, socket activation)
    and the spawn would just carry on: there its socket and its service are
    stopped instead (KillMode=process: the containers keep running), so LXD
    stays down until lxd_up()."""
    sys.path.insert(0, str(REPO / "setup"))
    import lxdhost

    unit = lxdhost.systemd_unit()
    if unit:
        for what in (f"{unit}.socket", unit):
            subprocess.run(["systemctl", "stop", what], capture_output=True, timeout=90)
        return
    os.kill(lxd_daemon_pid(), signal.SIGKILL)


def lxd_daemon_pid() -> int:
    out = subprocess.run(["pgrep", "-o", "-f", "^lxd --group"], capture_output=True, text=True)
    if out.returncode != 0:
        out = subprocess.run(["pgrep", "-o", "-x", "lxd"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def lxd_up() -> None:
    sys.path.insert(0, str(REPO / "setup"))
    import lxdhost

    unit = lxdhost.systemd_unit()
    if unit:
        subprocess.run(["systemctl", "start", f"{unit}.socket"], capture_output=True, timeout=60)
    p = subprocess.run([sys.executable, str(REPO / "setup" / "lxdhost.py"), "up"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


def follow_progress(hub, user: str, events: list) -> None:
    """The spawn's progress events, as the spawn page reads them."""
    url = f"{hub.api_url}/users/{user}/server/progress"
    with requests.get(url, headers={"Authorization": f"token {hub.token}"}, stream=True,
                      timeout=300, verify=str(hub.ca_file) if hub.ca_file else True) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                events.append(json.loads(line[5:]))


def test_lxd_killed_mid_spawn_says_so_and_the_retry_works(hub, lxd):
    hub.api("post", f"/users/{USER}")
    name = naming.instance_name(USER, SERVER, hub.run_tag)
    events: list[dict] = []
    try:
        r = hub.api("post", f"/users/{USER}/server")
        assert r.status_code in (201, 202), r.text
        reader = threading.Thread(target=follow_progress, args=(hub, USER, events), daemon=True)
        reader.start()
        # Kill LXD once the spawn is creating the container.
        deadline = time.monotonic() + 60
        while not any(e.get("message") == "creating container" for e in events):
            assert time.monotonic() < deadline, events
            time.sleep(0.02)
        kill_lxd()
        reader.join(240)
        assert events and events[-1].get("failed"), events
        message = events[-1]["message"]
        assert f"The GPU server {SERVER} stopped answering" in message, message
        assert "try again" in message
        assert "transaction" not in message and "HTTP 5" not in message, message
        assert "LXD stopped answering" in hub.log_text()
        model = hub.api("get", f"/users/{USER}").json()
        assert not model["servers"].get("", {}).get("ready")
    finally:
        lxd_up()
    # LXD is back: the same spawn goes through, whatever the first left behind.
    deadline = time.monotonic() + 60
    while True:
        r = hub.api("post", f"/users/{USER}/server")
        if r.status_code in (201, 202):
            break
        assert r.status_code == 400 and time.monotonic() < deadline, (r.status_code, r.text)
        time.sleep(1)      # the failed spawn is still being cleaned up
    try:
        server = wait_ready(hub, USER, timeout=240)
        assert server["ready"]
    finally:
        hub.api("delete", f"/users/{USER}/server")
        subprocess.run(["lxc", "delete", "--force", name], capture_output=True)
