"""Jupyter from the hub on a GPU server elsewhere, through a real hub.

node1 is this machine's LXD; node2 is the second real LXD daemon in a
network namespace of its own (tests/fixtures/lxd2.py), reached over HTTPS,
with its own node agent running in that namespace.  The hub serves beyond
loopback, as it must for GPU servers elsewhere; its site file names its URL
and address as node2 sees them (``[hub]``).

alice starts a server on each; on node2 the proxy reaches her Jupyter
through her Jupyter port on node2 (DNAT'd there for the hub's address
only), and her Jupyter calls the hub API at the hub's URL over HTTPS,
trusting the hub's CA that the spawner put into her container.  A kernel
there runs code; SSH to her port on node2 lands in her container there;
another machine of the lab cannot reach her Jupyter port on node2 (it can
reach her SSH port, which is open to anyone: the difference is the source
rule); a hub restart keeps both servers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys

import pytest

from lxcspawner import naming
from lxcspawner.settings import Settings
from tests.fixtures.hub import _ldap_settings, free_port, launch_hub
from tests.fixtures.lxd import REPO, TEST_KEY
from tests.fixtures.lxd2 import NamespacedAgent
from tests.fixtures.netns import sh
from tests.fixtures.sshkeys import keypair
from tests.integration.test_hub_spawn import run_code, start_server, wait_ready

pytestmark = pytest.mark.lxd

USER = "alice"
FIRST_ID_BLOCK = 14700
PORTS = ('ssh = "28300-28399"\nforward = "12200-12299"\njupyter = "20400-20499"\n')

# From another machine: one HTTP request to HOST:PORT; prints the status
# line, or "refused"/"timeout" (the arguments are argv, never code).
_HTTP_PROBE = r"""
import socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        s.settimeout(5)
        print(s.recv(200).decode("latin-1").splitlines()[0])
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print(type(e).__name__, e)
"""


@pytest.fixture(scope="module")
def two_server_hub(second_lxd, ldap_directory, run_tag, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-hub")
    port = free_port("0.0.0.0")
    toml = (f'[store]\nurl = "sqlite:///{root / "lxcgpu.sqlite"}"\n'
            f"first_id_block = {FIRST_ID_BLOCK}\n[ports]\n{PORTS}"
            f'[hub]\nurl = "https://{second_lxd.host_ip}:{port}"\n'
            f'address = "{second_lxd.host_ip}"\n'
            f"[servers.node1]\n{second_lxd.site_table('node2')}"
            f'[containers]\nprefix = "{run_tag}"\n')
    hub = launch_hub(root, toml, ldap_settings=_ldap_settings(ldap_directory),
                     admin_group=ldap_directory.admins_group_dn, tag_key=TEST_KEY,
                     tag=run_tag, service="lxcgpu-tests", bind_host="0.0.0.0",
                     public_port=port)
    agent = NamespacedAgent(second_lxd, root / "lxcgpu.toml", root / "node2-agent.log")
    agent.start()
    try:
        hub.start()
        hub.api("post", f"/users/{USER}")
        yield hub, agent
    finally:
        for name in ("node1", "node2"):
            hub.api("delete", f"/users/{USER}/servers/{name}")
        hub.stop()
        agent.stop()
        shutil.rmtree(hub.proxy_dir, ignore_errors=True)
        second_lxd.lxc("delete", "--force", naming.instance_name(USER, "node2", run_tag),
                       check=False)
        subprocess.run(["lxc", "delete", "--force", naming.instance_name(USER, "node1", run_tag)],
                       capture_output=True)


def admin(hub, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**hub.env, "SUDO_USER": "sysadm"}
    return subprocess.run([sys.executable, "-m", "lxcspawner.admin", *argv], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=600)


def test_jupyter_and_ssh_on_a_server_elsewhere(two_server_hub, second_lxd, client_netns, run_tag,
                                               tmp_path):
    hub, agent = two_server_hub
    key, pub = keypair(tmp_path, "alice-laptop")
    r = admin(hub, "key", "add", USER, stdin=pub + "\n")
    assert r.returncode == 0, r.stderr

    for name in ("node1", "node2"):
        start_server(hub, USER, name)
    for name in ("node1", "node2"):
        wait_ready(hub, USER, name, timeout=300)

    # A kernel in her container on node2, through the proxy, the DNAT'd
    # Jupyter port and back; her Jupyter reached the hub API over HTTPS.
    out = asyncio.run(run_code(hub, USER, "import socket; print(socket.gethostname())",
                               name="node2"))
    assert out.strip() == "node2-alice"
    out = asyncio.run(run_code(hub, USER, "import socket; print(socket.gethostname())",
                               name="node1"))
    assert out.strip() == "node1-alice"

    settings = Settings.load(hub.env["LXCGPU_CONFIG"])
    with settings.open_store() as store:
        rec = store.user(USER)
    name2 = naming.instance_name(USER, "node2", run_tag)
    ca = second_lxd.lxc("exec", name2, "--", "cat",
                        "/usr/local/share/ca-certificates/lxcgpu-hub.crt").stdout
    assert ca == hub.ca_file.read_text()

    # SSH to her one port on node2's address lands in her container there.
    ssh = subprocess.run(
        ["ssh", "-i", str(key), "-p", str(rec.ssh_port), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
         f"{naming.posix_name(USER)}@{second_lxd.address}", "--", "hostname"],
        capture_output=True, text=True, timeout=60)
    assert ssh.stdout.strip() == "node2-alice", ssh.stderr

    # Another machine of the lab (the client namespace, routed to node2
    # through this host) tries alice's Jupyter port on node2: no rule applies
    # to its address and the port is closed.  Her SSH port, open to anyone,
    # answers it: only the source rule stands between.  The hub (its
    # address) is answered on the Jupyter port.
    path = f"/user/{USER}/node2/api/status"
    jupyter_port = rec.jupyter_port + 1

    sh("ip", "-n", client_netns.name, "route", "replace", f"{second_lxd.address}/32", "via",
       client_netns.host_ip)

    def probe(port: int) -> str:
        r = client_netns.run(sys.executable, "-c", _HTTP_PROBE, second_lxd.address, str(port),
                             path, timeout=60)
        return r.stdout.strip() or r.stderr.strip()
    assert probe(jupyter_port) == "refused"
    assert probe(rec.ssh_port).startswith("SSH-2.0-")
    with socket.create_connection((second_lxd.address, jupyter_port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        assert s.recv(200).startswith(b"HTTP/1.1 "), "the hub is not answered"
    # The rule behind it: the named server's Jupyter port (P+1), for the hub only.
    assert (f"-A LXCGPU-DNAT -s {second_lxd.host_ip}/32 -p tcp -m tcp --dport "
            f"{jupyter_port} ") in agent.rules(), agent.rules()

    # A hub restart keeps both servers (re-adopted, not restarted).
    hub.restart()
    for name in ("node1", "node2"):
        wait_ready(hub, USER, name, timeout=60)
    out = asyncio.run(run_code(hub, USER, "print(6 * 7)", name="node2"))
    assert out.strip() == "42"
    assert "node2" in json.dumps(hub.api("get", f"/users/{USER}").json()["servers"])
