"""SSH and port forwards through the per-user NAT ports, end to end.

Real LXD, the real template image, real legacy iptables rules written by a
real ``lxcgpu-node`` process, and a client in a network namespace of its own
that reaches the host like an outside machine.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
import time

import pytest

from lxcspawner.container import ContainerSpec, ensure_container
from lxcspawner.portmap import FORWARD_PREFIX, SSH_PORT_KEY, config_changes
from lxcspawner.provision import provision
from lxcspawner.store import InvalidInput, Store
from monitor.node import changes_maps
from tests.fixtures.netns import sh
from tests.fixtures.sshkeys import keypair, ssh_banner

pytestmark = pytest.mark.lxd

SERVER = "nat1"
SSH_RANGE = (29000, 29999)        # far from the defaults a quickstart on this host uses
FORWARD_RANGE = (11900, 11999)


def _normalised(save: str) -> list[str]:
    """An iptables-save dump without comments and counters, to compare."""
    return [re.sub(r"\[\d+:\d+\]", "", line) for line in save.splitlines()
            if line and not line.startswith("#")]


@pytest.fixture(scope="module")
def sentinels(run_tag):
    """Rules of someone else's, in legacy and nft tables, added before our agent starts."""
    comment = f"lxcgpu-test-sentinel-{run_tag}"
    rules = [("iptables-legacy", "nat", "PREROUTING", "RETURN"),
             ("iptables-legacy", "nat", "OUTPUT", "RETURN"),
             ("iptables-legacy", "nat", "POSTROUTING", "RETURN"),
             ("iptables-legacy", "filter", "INPUT", "ACCEPT"),
             ("iptables-nft", "nat", "PREROUTING", "RETURN")]
    for tool, table, chain, target in rules:
        sh(tool, "-w", "-t", table, "-A", chain, "-p", "tcp", "--dport", "9", "-m", "comment",
           "--comment", comment, "-j", target)

    def snapshot() -> dict[str, list[str]]:
        return {tool: [line for line in _normalised(sh(tool + "-save").stdout) if "LXCT" not in line]
                for tool in ("iptables-legacy", "iptables-nft")}
    try:
        yield snapshot
    finally:
        for tool, table, chain, target in rules:
            sh(tool, "-w", "-t", table, "-D", chain, "-p", "tcp", "--dport", "9", "-m", "comment",
               "--comment", comment, "-j", target, check=False)


@pytest.fixture(scope="module")
def before(sentinels):
    return sentinels()


@pytest.fixture(scope="module")
def agent(before, node_agent):
    return node_agent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'lxcgpu.sqlite'}",
              ssh_ports=SSH_RANGE, forward_ports=FORWARD_RANGE)
    yield s
    s.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("natkeys")
    return {u: keypair(tmp, u) for u in ("alice", "bob")}


async def push_maps(plxd, store, user: str, name: str) -> None:
    """What the spawner and the portal do: the store's numbers into the config."""
    rec = await asyncio.to_thread(store.user, user)
    fwd = {f.host_port: f.container_port
           for f in await asyncio.to_thread(store.list_forwards, user, SERVER)}
    inst = await plxd.instance(name)
    changes = config_changes(inst["config"], rec.ssh_port, fwd)
    if changes:
        await plxd.update_config(name, changes)


@pytest.fixture(scope="module")
def plxd(nat_project):
    """LXD, in the project that the agent under test maps (see nat_project)."""
    return nat_project


@pytest.fixture(scope="module")
async def alice(plxd, store, keys, agent, idmap_blocks, run_tag, pinned_nics):
    """Alice's running container on SERVER (its address pinned, as lxcgpu
    does), her key from the store, her port mapped."""
    await asyncio.to_thread(store.add_key, "alice", keys["alice"][1], actor="test")
    spec = ContainerSpec(user="alice", server=SERVER, idmap_base=idmap_blocks(), prefix=run_tag,
                         nic=await pinned_nics())
    await ensure_container(plxd, spec)
    await push_maps(plxd, store, "alice", spec.name)
    await plxd.start(spec.name)
    await plxd.wait_for_address(spec.name, expected=spec.nic["ipv4.address"])
    await provision(plxd, spec.name, login=spec.posix_user,
                    keys=await asyncio.to_thread(store.authorized_keys, "alice"),
                    hostname=spec.hostname)
    return spec


def ssh_port(store, user="alice") -> int:
    return store.user(user).ssh_port


def wait_for_rules(agent, want: int, pattern: str, timeout: float = 10) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        rules = [r for r in agent.rules() if re.search(pattern, r)]
        if len(rules) == want or time.monotonic() > deadline:
            return rules
        time.sleep(0.05)


async def test_ssh_lands_in_own_container(plxd, alice, store, keys, client_netns, agent,
                                          logs_on_failure):
    logs_on_failure.append(alice.name)
    port = ssh_port(store)
    assert SSH_RANGE[0] <= port <= SSH_RANGE[1]
    ok, banner = await asyncio.to_thread(client_netns.probe, port, 30)
    assert ok and "SSH-2.0" in banner, banner
    p = await asyncio.to_thread(client_netns.ssh, keys["alice"][0], "alice", port,
                                "hostname; whoami; echo $SSH_CLIENT")
    assert p.returncode == 0, p.stderr
    hostname, whoami, ssh_client = p.stdout.split("\n")[:3]
    assert (hostname, whoami) == (alice.hostname, "alice")
    # No masquerading for outside clients: the container sees the real client.
    assert ssh_client.split()[0] == client_netns.client_ip
    p = await asyncio.to_thread(client_netns.ssh, keys["bob"][0], "alice", port, "true")
    assert p.returncode == 255 and "Permission denied" in p.stderr
    rules = agent.rules()
    assert any(f"--dport {port} " in r and "lxcgpu:" + alice.name in r for r in rules), rules


async def test_ssh_from_the_server_itself_over_loopback(plxd, alice, store, keys, agent):
    # route_localnet on the bridge plus the agent's loopback MASQUERADE.
    port = ssh_port(store)
    assert wait_for_rules(agent, 1, f"--dport {port} ")
    await asyncio.to_thread(ssh_banner, alice.nic["ipv4.address"], 30)
    p = await asyncio.to_thread(subprocess.run, [
        "ssh", "-i", str(keys["alice"][0]), "-p", str(port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", "alice@127.0.0.1", "--", "hostname"],
        capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == alice.hostname, p.stderr


async def test_restart_keeps_the_pinned_address_and_map(plxd, alice, store, keys, client_netns,
                                                        agent, logs_on_failure):
    logs_on_failure.append(alice.name)
    port = ssh_port(store)
    pinned = alice.nic["ipv4.address"]
    await plxd.stop(alice.name)
    assert wait_for_rules(agent, 0, f"--dport {port} ") == [], "stopped container still mapped"
    await plxd.start(alice.name)
    # Mapped at the start event, to the pinned address: before DHCP runs.
    assert wait_for_rules(agent, 1, f"--dport {port} .*--to-destination {pinned}:22$", 5)
    assert await plxd.wait_for_address(alice.name, expected=pinned) == pinned
    # The container's own sshd answering is the start line; the NAT path
    # must follow within 2 s of it.
    await asyncio.to_thread(ssh_banner, pinned, 30)
    ok, banner = await asyncio.to_thread(client_netns.probe, port, 2)
    assert ok and "SSH-2.0" in banner, (banner, agent.log_text()[-2000:])
    print(f"NAT path answered {banner.split()[-1]} s after the container's sshd")
    p = await asyncio.to_thread(client_netns.ssh, keys["alice"][0], "alice", port, "hostname")
    assert p.returncode == 0 and p.stdout.strip() == alice.hostname, p.stderr
    assert [r for r in agent.rules() if f"--dport {port} " in r][0].endswith(
        f"--to-destination {pinned}:22")


async def test_agent_rebuilds_flushed_chain_at_start(plxd, alice, store, keys, client_netns,
                                                     agent, logs_on_failure):
    logs_on_failure.append(alice.name)
    port = ssh_port(store)
    agent.kill()
    sh("iptables-legacy", "-w", "-t", "nat", "-F", agent.chain)
    assert agent.rules() == []
    ok, out = await asyncio.to_thread(client_netns.probe, port, 1)
    assert not ok, f"still reachable without rules: {out}"
    agent.start()
    ok, banner = await asyncio.to_thread(client_netns.probe, port, 10)
    assert ok, banner
    p = await asyncio.to_thread(client_netns.ssh, keys["alice"][0], "alice", port, "whoami")
    assert p.returncode == 0 and p.stdout.strip() == "alice", p.stderr


@pytest.fixture(scope="module")
async def web(plxd, alice):
    """Two small web servers inside alice's container, on ports 80 and 8080."""
    for port in (80, 8080):
        await plxd.make_dir(alice.name, f"/srv/www{port}")
        await plxd.put_file(alice.name, f"/srv/www{port}/index.html", f"hello from {port}\n")
        res = await plxd.execute(alice.name, [
            "systemd-run", f"--unit=lxcgpu-test-web{port}", "--", "python3", "-m", "http.server",
            str(port), "--bind", "0.0.0.0", "--directory", f"/srv/www{port}"], timeout=30)
        res.check(["systemd-run"])
    addr = alice.nic["ipv4.address"]
    for port in (80, 8080):
        deadline = time.monotonic() + 20
        while subprocess.run(["python3", "-c", "import socket,sys; socket.create_connection("
                              "(sys.argv[1], int(sys.argv[2])), timeout=1)", addr, str(port)],
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, f"web server on {port} did not start"
            time.sleep(0.1)
    return alice


async def test_forward_answers_and_stops_when_removed(plxd, web, store, client_netns, agent,
                                                      logs_on_failure):
    logs_on_failure.append(web.name)
    f80 = await asyncio.to_thread(store.add_forward, "alice", SERVER, 80, actor="test")
    f8080 = await asyncio.to_thread(store.add_forward, "alice", SERVER, "8080", actor="test")
    assert FORWARD_RANGE[0] <= f80.host_port <= FORWARD_RANGE[1]
    assert f80.host_port != f8080.host_port
    await push_maps(plxd, store, "alice", web.name)
    cfg = (await plxd.instance(web.name))["config"]
    assert cfg[f"{FORWARD_PREFIX}{f80.host_port}"] == "80"
    for f in (f80, f8080):
        assert wait_for_rules(agent, 1, f"--dport {f.host_port} ")
        ok, body = await asyncio.to_thread(client_netns.http_get, f.host_port)
        assert ok and f"hello from {f.container_port}" in body, body

    await asyncio.to_thread(store.remove_forward, "alice", SERVER, container_port=80,
                            actor="test")
    await push_maps(plxd, store, "alice", web.name)
    assert wait_for_rules(agent, 0, f"--dport {f80.host_port} ") == []
    ok, body = await asyncio.to_thread(client_netns.http_get, f80.host_port, "/", 2)
    assert not ok, body
    ok, body = await asyncio.to_thread(client_netns.http_get, f8080.host_port)
    assert ok and "hello from 8080" in body, body
    cfg = (await plxd.instance(web.name))["config"]
    assert f"{FORWARD_PREFIX}{f80.host_port}" not in cfg
    assert cfg[f"{FORWARD_PREFIX}{f8080.host_port}"] == "8080"
    assert cfg[SSH_PORT_KEY] == str(ssh_port(store))


async def test_concurrent_identical_forwards_make_one_rule(plxd, web, store, agent):
    results, errors = [], []
    barrier = threading.Barrier(50)

    def ask():
        barrier.wait()
        try:
            results.append(store.add_forward("alice", SERVER, 9000, actor="test"))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.host_port for r in results}) == 1
    assert [f.container_port for f in store.list_forwards("alice", SERVER)].count(9000) == 1
    await push_maps(plxd, store, "alice", web.name)
    rules = wait_for_rules(agent, 1, r":9000$")
    assert len(rules) == 1 and f"--dport {results[0].host_port} " in rules[0], agent.rules()


@pytest.mark.parametrize("port", [0, -1, 65536, 70000, "80a", "eighty", "", " ", "1e3", None])
async def test_bad_forward_ports_change_nothing(plxd, web, store, port):
    before_rows = store.list_forwards()
    before_cfg = (await plxd.instance(web.name))["config"]
    with pytest.raises(InvalidInput) as err:
        store.add_forward("alice", SERVER, port, actor="test")
    assert "port" in str(err.value).lower()
    assert store.list_forwards() == before_rows
    await push_maps(plxd, store, "alice", web.name)
    assert (await plxd.instance(web.name))["config"] == before_cfg


async def test_taken_or_out_of_range_host_ports_change_nothing(plxd, web, store):
    taken = store.list_forwards("alice", SERVER)[0]
    before_rows = store.list_forwards()
    before_cfg = (await plxd.instance(web.name))["config"]
    for port, host_port, message in [
            (7000, taken.host_port, "already in use"),           # another forward's port
            (7000, store.user("alice").ssh_port, "forward range"),  # an SSH port
            (7000, FORWARD_RANGE[1] + 1, "forward range"),
            (7000, "11x", "host port must be a number"),
            (taken.container_port, FORWARD_RANGE[1], "already forwarded")]:
        with pytest.raises(InvalidInput) as err:
            store.add_forward("alice", SERVER, port, actor="test", host_port=host_port)
        assert message in str(err.value), err.value
    assert store.list_forwards() == before_rows
    await push_maps(plxd, store, "alice", web.name)
    assert (await plxd.instance(web.name))["config"] == before_cfg


_REACH_HOST_LOOPBACK = r"""
set -u
port=$1
gw=$(ip -4 route show default | awk '{print $3; exit}')
addr=$(ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
for k in eth0.route_localnet all.route_localnet eth0.rp_filter all.rp_filter; do
    v=1; case $k in *rp_filter) v=0;; esac
    sysctl -qw net.ipv4.conf.$k=$v
done
ip route del table local local 127.0.0.0/8 dev lo
ip route del table local local 127.0.0.1 dev lo
ip route add 127.0.0.1/32 via "$gw" dev eth0 src "$addr"
python3 -c 'import socket, sys; s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3); print(s.recv(16).decode())' "$port"
rc=$?
ip route del 127.0.0.1/32
ip route add table local local 127.0.0.0/8 dev lo
ip route add table local local 127.0.0.1 dev lo src 127.0.0.1
exit $rc
"""


async def test_containers_cannot_reach_the_servers_loopback(plxd, alice, agent):
    # route_localnet (for `ssh -p PORT localhost` on the server) would let a
    # container's root route 127.0.0.1 to its gateway and reach the server's
    # loopback services (the proxy's API, slapd); without the agent's
    # LXCGPU-INPUT guard this very script reads the secret.
    import socket
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(15)
    port = server.getsockname()[1]
    got = []

    def serve():
        try:
            conn, peer = server.accept()
            got.append(peer)
            conn.sendall(b"loopback-secret")
            conn.close()
        except OSError:
            pass
    t = threading.Thread(target=serve)
    t.start()
    try:
        res = await plxd.execute(alice.name, ["sh", "-c", _REACH_HOST_LOOPBACK, "sh", str(port)],
                                 timeout=60)
    finally:
        server.close()
        t.join()
    assert res.returncode != 0 and "loopback-secret" not in res.stdout, (res.stdout, res.stderr)
    assert got == []
    assert any("-j REJECT" in r for r in
               sh("iptables-legacy", "-w", "-S", agent.prefix + "-INPUT").stdout.splitlines())
    # The container's own loopback is back.
    res = await plxd.execute(alice.name, ["python3", "-c", "import socket; socket.create_server("
                                          "('127.0.0.1', 0)).close()"], timeout=30)
    assert res.returncode == 0, res.stderr


async def test_hand_written_map_to_the_servers_own_ssh_port_is_refused(plxd, web, store, agent):
    # Host port 22 is outside the agent's ranges: mapping it would take the
    # server's own sshd away from its admins.
    key = f"{FORWARD_PREFIX}22"
    await plxd.update_config(web.name, {key: "22"})
    try:
        deadline = time.monotonic() + 10
        while "asks for host port 22, outside the allowed ranges" not in agent.log_text():
            assert time.monotonic() < deadline, agent.log_text()[-2000:]
            await asyncio.sleep(0.05)
        assert not any("--dport 22 " in r for r in agent.rules())
        assert any(f"--dport {ssh_port(store)} " in r for r in agent.rules())
    finally:
        await plxd.update_config(web.name, {key: None})


async def test_agent_passes_over_the_events_of_execs_and_file_reads(plxd, alice):
    """A spawn's execs and file reads raise a score of LXD events; the agent
    reads a container again only for the ones that may change its maps (the
    names checked against what this LXD really sends)."""
    seen: list[str] = []
    stream = plxd.follow_events(lambda e: seen.append((e.get("metadata") or {}).get("action")))
    try:
        await asyncio.sleep(0.5)
        await plxd.execute(alice.name, ["true"])
        await plxd.get_file(alice.name, "/etc/hostname")
        await plxd.put_file(alice.name, "/tmp/lxcgpu-event-test", "x")
        await plxd.update_config(alice.name, {"user.lxcgpu-test.event": "1"})
        await plxd.update_config(alice.name, {"user.lxcgpu-test.event": None})
        deadline = time.monotonic() + 10
        while seen.count("instance-updated") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stream.close()
    quiet = {a for a in seen if a.startswith(("instance-exec", "instance-file-", "instance-log-"))}
    assert {"instance-exec", "instance-file-retrieved", "instance-file-pushed"} <= quiet, seen
    assert not any(changes_maps(a) for a in quiet)
    assert changes_maps("instance-updated") and seen.count("instance-updated") == 2, seen
    for action in ("instance-started", "instance-stopped", "instance-shutdown",
                   "instance-created", "instance-deleted", "instance-renamed",
                   "instance-restored", "instance-restarted"):
        assert changes_maps(action), action


async def test_rules_outside_our_chains_are_untouched(sentinels, before, agent, alice):
    # Runs last in this module: the agent has set up, synced, been killed,
    # restarted and resynced by now.
    assert agent.rules(), "the agent's own chain should hold rules at this point"
    assert sentinels() == before
