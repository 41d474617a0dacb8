"""keyportal's REST API through the real hub, its proxy, LXD and slapd.

alice and bob each get a token from the hub (as the hub's token page makes
them: the owner's permissions).  alice adds a key (it lands in her running
container), makes her container, snapshots it, breaks a file, restores it
and finds it back; bob's token can do none of that to her, a token without
the portal's scope gets 403, a token in the URL is refused, and bad input is
refused with a sentence and changes nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import stat
import subprocess
import time
from pathlib import Path

import pytest

from lxcspawner import naming
from lxcspawner.lxd import LXD
from lxcspawner.settings import Settings
from tests.fixtures.sshkeys import keypair

pytestmark = pytest.mark.lxd

ALICE, BOB = "alice", "bob"
SERVER = "node1"


class Client:
    """One user's token against the portal's API."""

    def __init__(self, hub, token: str | None):
        self.hub, self.token = hub, token
        self.base = f"{hub.url}/services/keyportal/api/v1/"

    def __call__(self, method: str, path: str, *, token: str | None = "own", **kw):
        headers = kw.pop("headers", {})
        token = self.token if token == "own" else token
        if token:
            headers["Authorization"] = f"token {token}"
        kw.setdefault("timeout", 300)
        with self.hub.session() as s:
            return s.request(method, self.base + path, headers=headers,
                             allow_redirects=False, **kw)


def make_token(hub, user: str, scopes: list[str] | None = None) -> str:
    hub.api("post", f"/users/{user}")
    body = {"note": "keyportal tests", "expires_in": 3600}
    if scopes is not None:
        body["scopes"] = scopes
    r = hub.api("post", f"/users/{user}/tokens", json=body)
    assert r.status_code == 201, (r.status_code, r.text)
    return r.json()["token"]


def finished(client: Client, r, *, kind: str) -> dict:
    """A long operation started by ``r`` (202), polled to its end through
    api/v1/operations/ID?wait=; its result.  The steps it reported are
    collected in ``result["_steps"]``."""
    assert r.status_code == 202, r.text
    op = r.json()
    assert op["kind"] == kind and op["status"] in ("running", "done", "failed")
    assert r.headers["Location"].endswith(f"/services/keyportal/api/v1/operations/{op['id']}")
    steps = [op["step"]]
    deadline = time.monotonic() + 600
    while op["status"] == "running" and time.monotonic() < deadline:
        # A short wait: each step it passes through is seen.
        got = client("get", f"operations/{op['id']}?wait=0.5")
        assert got.status_code == 200, got.text
        op = got.json()
        if op["step"] != steps[-1]:
            steps.append(op["step"])
    assert op["status"] == "done", op
    assert op["finished"] and op["code"] is None and op["message"] is None
    return {**op["result"], "_steps": steps}


@pytest.fixture(scope="module")
def clients(hub):
    return {u: Client(hub, make_token(hub, u)) for u in (ALICE, BOB)}


@pytest.fixture(scope="module")
def lxd():
    client = LXD(timeout=120, retries=1)
    yield client
    client.close()


@pytest.fixture(scope="module")
def alice_container(hub, clients, lxd):
    """alice's container on node1, made through the portal if she has none;
    deleted at the end if the portal made it."""
    name = naming.instance_name(ALICE, SERVER, hub.run_tag)
    existed = asyncio.run(lxd.instance(name)) is not None
    r = clients[ALICE]("post", f"containers/{SERVER}")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == name
    yield name
    if not existed:
        asyncio.run(lxd.delete_instance(name))


def test_me_servers_and_the_ssh_config(clients):
    r = clients[ALICE]("get", "me")
    assert r.status_code == 200, r.text
    me = r.json()
    assert me["name"] == ALICE and me["login"] == "alice" and me["ssh_port"] > 0
    r = clients[ALICE]("get", "servers")
    assert [s["name"] for s in r.json()] == [SERVER]
    r = clients[ALICE]("get", "ssh-config")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert f"Host {SERVER}\n" in r.text and f"Port {me['ssh_port']}\n" in r.text
    assert "User alice\n" in r.text


def test_who_may_call_it(hub, clients):
    # What is here, for anyone: paths, no user data.
    with hub.session() as s:
        r = s.get(f"{hub.url}/services/keyportal/api/v1/", timeout=30)
        assert r.status_code == 200 and "GET me" in r.json()["paths"]
        # The page: a browser without a session is sent to the hub's login.
        r = s.get(f"{hub.url}/services/keyportal/", timeout=30, allow_redirects=False)
        assert r.status_code == 302 and "/hub/api/oauth2/authorize" in r.headers["Location"]
    # No token: 401 with a sentence.
    r = clients[ALICE]("get", "me", token=None)
    assert r.status_code in (401, 302), r.text
    # A token in the URL is refused, whoever's it is.
    r = clients[ALICE]("get", f"me?token={clients[ALICE].token}", token=None)
    assert r.status_code == 400 and "Authorization header" in r.json()["message"]
    # A token of alice's without the portal's scopes.
    narrow = make_token(hub, ALICE, ["read:users!user=alice"])
    r = clients[ALICE]("get", "me", token=narrow)
    assert r.status_code == 403 and "keyportal" in r.json()["message"], r.text
    # Access to the service but not the portal's own scope.
    narrow = make_token(hub, ALICE, ["access:services!service=keyportal"])
    r = clients[ALICE]("get", "keys", token=narrow)
    assert r.status_code == 403 and "custom:keyportal:use" in r.json()["message"]
    r = clients[ALICE]("get", "nowhere")
    assert r.status_code == 404 and "no such" in r.json()["message"]


def test_keys_added_checked_and_removed(clients, alice_container, lxd, tmp_path):
    alice = clients[ALICE]
    _, pub = keypair(tmp_path, "alice-portal")
    before = alice("get", "keys").json()
    bad = [
        ("not a key", "not a valid ssh public key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
         "-----END OPENSSH PRIVATE KEY-----", "private"),
        (f'command="/bin/sh" {pub}', "option"),
        ("ssh-ed25519 " + "A" * (1024 * 1024), "larger"),
    ]
    for text, said in bad:
        r = alice("post", "keys", json={"key": text})
        assert r.status_code in (400, 413), (r.status_code, r.text)
        assert said in r.json()["message"].lower(), r.json()
    assert alice("get", "keys").json() == before
    r = alice("post", "keys", json={"key": pub})
    assert r.status_code == 201, r.text
    added = r.json()
    fp = added["added"][0]["fingerprint"]
    assert {s["server"]: s["status"] for s in added["servers"]} == {SERVER: "done"}
    # In her container, as sshd reads it.
    res = asyncio.run(lxd.execute(alice_container, ["cat", "/home/alice/.ssh/authorized_keys"]))
    assert pub.split()[1] in res.stdout
    # The same key again: nothing changes.
    r = alice("post", "keys", json={"key": pub})
    assert r.status_code == 201 and len(alice("get", "keys").json()) == len(before) + 1
    # bob cannot see or remove it.
    assert fp not in json.dumps(clients[BOB]("get", "keys").json())
    r = clients[BOB]("delete", f"keys/{fp}")
    assert r.status_code == 404, r.text
    assert fp in json.dumps(alice("get", "keys").json())
    r = alice("delete", "keys/" + fp.replace("/", "%2F"))
    assert r.status_code == 200, r.text
    res = asyncio.run(lxd.execute(alice_container, ["cat", "/home/alice/.ssh/authorized_keys"]))
    assert pub.split()[1] not in res.stdout


def test_snapshot_break_restore(clients, alice_container, lxd):
    alice = clients[ALICE]
    path = "/home/alice/precious.txt"
    asyncio.run(lxd.put_file(alice_container, path, "the thesis\n", mode=0o644))
    for name in ("a/b", "..", "has space", "x;rm -rf /", ".hidden", "a" * 64):
        r = alice("post", f"containers/{SERVER}/snapshots", json={"name": name})
        assert r.status_code == 400 and "not a snapshot name" in r.json()["message"], r.text
    r = alice("post", f"containers/{SERVER}/snapshots", json={"name": "before-break"})
    assert r.status_code == 201, r.text
    try:
        names = [s["name"] for s in alice("get", f"containers/{SERVER}/snapshots").json()]
        assert "before-break" in names
        # bob sees no container of alice's, and cannot restore or delete hers.
        r = clients[BOB]("post", f"containers/{SERVER}/snapshots/before-break/restore")
        assert r.status_code == 404, r.text
        r = clients[BOB]("get", f"containers/{SERVER}/snapshots")
        assert r.status_code == 404 or "before-break" not in r.text
        asyncio.run(lxd.put_file(alice_container, path, "broken\n", mode=0o644))
        r = alice("post", f"containers/{SERVER}/snapshots/before-break/restore")
        assert r.status_code == 200, r.text
        data = asyncio.run(lxd.get_file(alice_container, path))
        assert data == b"the thesis\n"
        assert asyncio.run(lxd.state(alice_container)).running
        r = alice("post", f"containers/{SERVER}/snapshots/nope/restore")
        assert r.status_code == 404 and "no snapshot nope" in r.json()["message"]
    finally:
        r = alice("delete", f"containers/{SERVER}/snapshots/before-break")
    assert r.status_code == 200, r.text
    assert "before-break" not in alice("get", f"containers/{SERVER}/snapshots").text


def test_gpus_on_a_server_without_any(clients, alice_container, lxd):
    """This machine has no GPU: the list is empty, "all" is the choice (no
    device), a GPU by index is refused naming what the server has, bad
    input is refused, and nothing changes."""
    alice = clients[ALICE]
    r = alice("get", f"containers/{SERVER}/gpus")
    assert r.status_code == 200 and r.json() == {"server": SERVER, "choice": "all", "gpus": []}
    r = alice("put", f"containers/{SERVER}/gpus", json={"gpus": ["0"]})
    assert r.status_code == 400 and r.json()["message"] == f"{SERVER} has no GPU '0'; it has no GPUs"
    for bad in ({"gpus": 5}, {"gpus": [True]}, {}, {"gpus": ["x"] * 65}):
        r = alice("put", f"containers/{SERVER}/gpus", json=bad)
        assert r.status_code == 400, (bad, r.text)
    r = alice("put", f"containers/{SERVER}/gpus", json={"gpus": "all"})
    assert r.status_code == 200 and r.json()["choice"] == "all", r.text
    inst = asyncio.run(lxd.instance(alice_container))
    assert not [d for d in inst["devices"] if d.startswith("lxcgpu-gpu")]
    assert "user.lxcgpu.gpus" not in inst["config"]
    assert clients[BOB]("put", f"containers/{SERVER}/gpus?user={ALICE}",
                        json={"gpus": "all"}).status_code == 403


def test_forwards_and_unknown_servers(clients, alice_container):
    alice = clients[ALICE]
    for port in (0, 70000, "80; ls", None):
        r = alice("post", f"containers/{SERVER}/forwards", json={"port": port})
        assert r.status_code == 400, (port, r.text)
    assert alice("get", f"containers/{SERVER}/forwards").json() == []
    r = alice("post", f"containers/{SERVER}/forwards", json={"port": 8080})
    assert r.status_code == 201, r.text
    host_port = r.json()["forward"]["host_port"]
    assert [f["host_port"] for f in alice("get", f"containers/{SERVER}/forwards").json()] == [
        host_port]
    assert clients[BOB]("get", f"containers/{SERVER}/forwards").json() == []
    r = clients[BOB]("delete", f"containers/{SERVER}/forwards/8080")
    assert r.status_code == 404, r.text
    r = alice("delete", f"containers/{SERVER}/forwards/8080")
    assert r.status_code == 200, r.text
    r = alice("get", "containers/nowhere/snapshots")
    assert r.status_code == 404 and "unknown GPU server" in r.json()["message"]
    containers = alice("get", "containers").json()
    assert [(c["server"], c["exists"], c["state"]) for c in containers] == [
        (SERVER, True, "running")]
    assert containers[0]["ssh_command"].startswith("ssh -p ")


def test_stop_and_start(hub, clients, alice_container, lxd):
    alice = clients[ALICE]
    # bob's stop acts on bob's container only (he may have none: 404).
    r = clients[BOB]("post", f"containers/{SERVER}/stop")
    assert r.status_code in (200, 404), r.text
    assert r.status_code == 404 or r.json()["name"] != alice_container
    assert asyncio.run(lxd.state(alice_container)).running
    r = alice("post", f"containers/{SERVER}/stop")
    assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
    assert not asyncio.run(lxd.state(alice_container)).running
    r = alice("post", f"containers/{SERVER}/start")
    assert r.status_code == 200, r.text
    assert r.json()["address"] and asyncio.run(lxd.state(alice_container)).running
    r = alice("post", f"containers/{SERVER}/reboot")
    assert r.status_code == 404
    # Every change above is in the audit log, with where it came from.
    store = Settings.load(hub.env["LXCGPU_CONFIG"]).open_store()
    try:
        audit = [a for a in store.audit_log(user=ALICE, limit=200) if a.actor == ALICE]
    finally:
        store.close()
    ours = {"container.stop", "container.up", "snapshot.create", "snapshot.restore",
            "snapshot.delete", "keys.push", "forwards.push"}
    assert ours | {"key.add", "key.remove", "forward.add", "forward.remove"} <= {
        a.action for a in audit}
    assert all(json.loads(a.detail).get("source") for a in audit if a.action in ours)


def test_admin_endpoints(hub, clients, alice_container, ldap_directory):
    # carol is in the directory's admin group: her login makes her a hub
    # admin, and her tokens carry the hub's admin scopes.
    from tests.integration.test_hub_login import login
    s, r = login(hub, "carol", ldap_directory.passwords["carol"])
    assert r.status_code == 302, r.text
    assert hub.api("get", "/users/carol").json()["admin"] is True
    admin = Client(hub, make_token(hub, "carol"))
    for path in ("admin/users", "admin/containers", "admin/audit"):
        r = clients[ALICE]("get", path)
        assert r.status_code == 403 and "custom:keyportal:admin" in r.json()["message"]
    r = clients[ALICE]("post", "admin/push-keys", json={})
    assert r.status_code == 403

    users = {u["name"]: u for u in admin("get", "admin/users").json()}
    assert users[ALICE]["ssh_port"] > 0 and users[ALICE]["login"] == "alice"
    rows = admin("get", "admin/containers").json()
    assert {"server": SERVER, "name": alice_container, "owner": ALICE, "state": "running"} in rows
    audit = admin("get", "admin/audit?user=alice&q=snapshot&limit=20").json()
    assert audit and all(a["target"] == ALICE and "snapshot" in json.dumps(a).lower()
                         for a in audit)
    r = admin("get", "admin/audit?limit=lots")
    assert r.status_code == 400
    r = admin("post", "admin/push-keys", json={"user": ALICE})
    assert r.status_code == 200, r.text
    assert r.json()["users"][ALICE] == [
        {"server": SERVER, "status": "done", "detail": f"keys and port maps updated in "
                                                       f"{alice_container}"}]
    r = admin("post", "admin/push-keys", json={"user": "nobody-at-all"})
    assert r.status_code == 404, r.text

    # An admin acts for a user with ?user= (audited as the admin); a user cannot.
    r = clients[ALICE]("get", f"containers?user={BOB}")
    assert r.status_code == 403 and "administrators" in r.json()["message"]
    r = admin("get", "containers?user=nobody-at-all")
    assert r.status_code == 404
    r = admin("post", f"containers/{SERVER}/stop?user={ALICE}")
    assert r.status_code == 200 and r.json()["name"] == alice_container, r.text
    assert clients[ALICE]("get", "containers").json()[0]["state"] == "stopped"
    r = admin("post", f"containers/{SERVER}/start?user={ALICE}")
    assert r.status_code == 200, r.text
    stops = admin("get", "admin/audit?user=alice&q=container.stop&limit=5").json()
    assert stops[0]["actor"] == "carol" and stops[0]["target"] == ALICE


def test_the_openapi_description_is_served(hub):
    with hub.session() as s:
        r = s.get(f"{hub.url}/services/keyportal/api/v1/openapi.json", timeout=30)
    assert r.status_code == 200
    doc = r.json()
    assert doc["servers"] == [{"url": "/services/keyportal/api/v1"}]
    assert "/containers/{server}/snapshots/{name}/restore" in doc["paths"]


def test_export_lands_in_the_folder_and_imports_again(hub, clients, alice_container, lxd):
    r = clients[ALICE]("post", "containers/nowhere/export")
    assert r.status_code == 404
    out = finished(clients[ALICE], clients[ALICE]("post", f"containers/{SERVER}/export"),
                   kind="export")
    path = Path(out["file"])
    exports = Path(Settings.load(hub.env["LXCGPU_CONFIG"]).export_dir)
    assert path.parent == exports / "alice" and path.name.startswith(alice_container)
    assert path.stat().st_size == out["bytes"] > 1_000_000
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(exports.rglob("*.part"))
    # LXD's own import brings it back (under another name here; not started).
    copy = f"{hub.run_tag}-imported"
    p = subprocess.run(["lxc", "import", str(path), copy], capture_output=True, text=True,
                       timeout=900)
    try:
        assert p.returncode == 0, p.stderr
        inst = asyncio.run(lxd.instance(copy))
        assert inst["config"]["user.lxcgpu.owner"] == ALICE
    finally:
        subprocess.run(["lxc", "delete", "--force", copy], capture_output=True, timeout=300)
        path.unlink(missing_ok=True)


def test_scheduled_snapshots_and_hand_made_ones_kept(clients, alice_container, lxd):
    alice = clients[ALICE]
    path = f"containers/{SERVER}/snapshot-schedule"
    assert alice("get", path).json()["schedule"] == ""
    for body, said in (({"schedule": "*/5 * * * *", "keep": 3}, "schedule: one of"),
                       ({"schedule": "@daily", "keep": 99}, "keep:"),
                       ({"schedule": "@daily"}, "keep:")):
        r = alice("put", path, json=body)
        assert r.status_code == 400 and said in r.json()["message"], r.text
    r = alice("put", path, json={"schedule": "@daily", "keep": 3})
    assert r.status_code == 200 and r.json()["keep"] == 3, r.text
    cfg = asyncio.run(lxd.instance(alice_container))["config"]
    assert (cfg["snapshots.schedule"], cfg["snapshots.expiry"]) == ("@daily", "3d")
    assert cfg["snapshots.pattern"].startswith("auto-")
    # A snapshot made by hand is not given the schedule's expiry.
    r = alice("post", f"containers/{SERVER}/snapshots", json={"name": "by-hand"})
    assert r.status_code == 201, r.text
    try:
        snap = [x for x in alice("get", f"containers/{SERVER}/snapshots").json()
                if x["name"] == "by-hand"][0]
        assert snap["expires_at"].startswith("2999-")
        r = alice("post", f"containers/{SERVER}/snapshots", json={"name": "auto-mine"})
        assert r.status_code == 400 and "scheduled" in r.json()["message"]
        r = clients[BOB]("put", path + f"?user={ALICE}", json={"schedule": ""})
        assert r.status_code == 403
    finally:
        alice("delete", f"containers/{SERVER}/snapshots/by-hand")
        r = alice("put", path, json={"schedule": ""})
    assert r.status_code == 200 and r.json()["schedule"] == ""
    cfg = asyncio.run(lxd.instance(alice_container))["config"]
    assert "snapshots.schedule" not in cfg and "snapshots.expiry" not in cfg


def test_rebuild_keeps_the_home_and_replaces_the_system(hub, clients, alice_container, lxd,
                                                        tmp_path):
    """lxc-gpu's `rebuild`: a new system from the template; the home (its
    files and their owner), address, SSH port, keys and snapshot schedule
    stay.  The first rebuild moves the home into a volume of its own; from
    then on snapshots take the home with the system and restore both."""
    alice, name = clients[ALICE], alice_container
    started = datetime.datetime.now(datetime.timezone.utc)
    _, pub = keypair(tmp_path, "alice-rebuild")
    assert alice("post", "keys", json={"key": pub}).status_code == 201
    home = "/home/alice"
    uid = asyncio.run(lxd.file_entry(name, home)).uid
    asyncio.run(lxd.put_file(name, f"{home}/thesis.txt", "chapter 1\n", mode=0o600,
                             uid=uid, gid=uid))
    asyncio.run(lxd.put_file(name, "/usr/local/bin/tool", "#!/bin/sh\n", mode=0o755))
    before = asyncio.run(lxd.instance(name))
    assert alice("post", f"containers/{SERVER}/snapshots",
                 json={"name": "old-system"}).status_code == 201
    assert alice("put", f"containers/{SERVER}/snapshot-schedule",
                 json={"schedule": "@weekly", "keep": 2}).status_code == 200
    # Nobody else rebuilds it: bob's own call names his own container, and
    # he may not act for alice.
    assert clients[BOB]("post", f"containers/{SERVER}/rebuild?user={ALICE}").status_code == 403
    assert asyncio.run(lxd.file_entry(name, "/usr/local/bin/tool")) is not None
    assert asyncio.run(lxd.instance(name))["config"]["volatile.uuid"] == \
        before["config"]["volatile.uuid"]
    volume = f"{name}-home"
    try:
        r = alice("post", f"containers/{SERVER}/rebuild")
        op_id = r.json().get("id")
        # While it runs the container is busy: another change is refused.
        busy = alice("post", f"containers/{SERVER}/snapshots", json={"name": "meanwhile"})
        assert busy.status_code == 409 and "busy: a rebuild" in busy.json()["message"], busy.text
        assert alice("post", f"containers/{SERVER}/rebuild").status_code == 409
        # Only alice (or an admin) follows her operation.
        assert clients[BOB]("get", f"operations/{op_id}").status_code == 404
        assert op_id not in [o["id"] for o in clients[BOB]("get", "operations").json()]
        bad = alice("get", f"operations/{op_id}?wait=forever")
        assert bad.status_code == 400 and "wait:" in bad.json()["message"]
        out = finished(alice, r, kind="rebuild")
        assert out["home_moved"] is True and out["snapshots_removed"] == ["old-system"]
        # It said what it was doing, step by step.
        assert len(set(out["_steps"]) - {"starting", "done"}) >= 2, out["_steps"]
        assert out["_steps"][-1] == "done"
        assert [o["status"] for o in alice("get", "operations").json()
                if o["id"] == op_id] == ["done"]
        after = asyncio.run(lxd.instance(name))
        assert after["devices"]["lxcgpu-home"]["source"] == volume
        assert after["devices"]["eth0"]["ipv4.address"] == before["devices"]["eth0"][
            "ipv4.address"] == out["address"]
        assert after["config"]["user.lxcgpu.ssh-port"] == before["config"]["user.lxcgpu.ssh-port"]
        # Her id block as the store has it (the one her container had, unless
        # it was made outside this store: in a full run another test's fixture
        # made a container of that name; LXD then shifts the home to it).
        store = Settings.load(hub.env["LXCGPU_CONFIG"]).open_store()
        try:
            base = store.get_user(ALICE).idmap_base
        finally:
            store.close()
        assert after["config"]["security.idmap.base"] == str(base)
        assert after["config"]["snapshots.schedule"] == "@weekly"
        assert after["config"]["volatile.uuid"] != before["config"]["volatile.uuid"]
        assert asyncio.run(lxd.file_entry(name, "/usr/local/bin/tool")) is None
        thesis = asyncio.run(lxd.file_entry(name, f"{home}/thesis.txt"))
        assert thesis.data == b"chapter 1\n" and thesis.uid == uid
        assert asyncio.run(lxd.file_entry(name, home)).uid == uid
        keys = asyncio.run(lxd.execute(name, ["cat", f"{home}/.ssh/authorized_keys"])).stdout
        assert pub.split()[1] in keys
        res = asyncio.run(lxd.execute(name, ["id", "-u", "alice"]))
        assert res.stdout.strip() == str(uid)
        assert alice("get", f"containers/{SERVER}/snapshots").json() == []
        vol = asyncio.run(lxd.volume("lxcgpu", volume))
        assert vol["config"].get("snapshots.schedule") is None   # set through the portal only
        # From now on a snapshot has the home with it, and a restore brings both back.
        assert alice("post", f"containers/{SERVER}/snapshots",
                     json={"name": "with-home"}).status_code == 201
        snaps = alice("get", f"containers/{SERVER}/snapshots").json()
        assert [(s["name"], s["home"]) for s in snaps] == [("with-home", True)]
        asyncio.run(lxd.put_file(name, f"{home}/thesis.txt", "overwritten\n", mode=0o600,
                                 uid=uid, gid=uid))
        r = alice("post", f"containers/{SERVER}/snapshots/with-home/restore")
        assert r.status_code == 200 and r.json()["home"] == "restored", r.text
        assert asyncio.run(lxd.get_file(name, f"{home}/thesis.txt")) == b"chapter 1\n"
        assert asyncio.run(lxd.state(name)).running
        # A second rebuild copies nothing; the home is still there.
        out = finished(alice, alice("post", f"containers/{SERVER}/rebuild"), kind="rebuild")
        assert out["home_moved"] is False
        assert out["snapshots_removed"] == ["with-home"]
        assert asyncio.run(lxd.get_file(name, f"{home}/thesis.txt")) == b"chapter 1\n"
        # The home's snapshots stay with the volume (the system's went).
        homes = asyncio.run(lxd.snapshots(volume, pool="lxcgpu"))
        assert [s["name"] for s in homes] == ["with-home"]
        # An export writes the home beside the system.
        out = finished(alice, alice("post", f"containers/{SERVER}/export"), kind="export")
        files = [Path(out["file"]), Path(out["home_file"])]
        assert files[1].name.startswith(volume) and files[1].stat().st_size == \
            out["home_bytes"] > 0
        assert out["_steps"][-1] == "done", out["_steps"]
        for f in files:
            f.unlink()
        store = Settings.load(hub.env["LXCGPU_CONFIG"]).open_store()
        try:
            rebuilds = [a for a in store.audit_log(user=ALICE, limit=50)
                        if a.action == "container.rebuild" and a.time >= started]
        finally:
            store.close()
        assert len(rebuilds) == 2 and all(json.loads(a.detail).get("source") for a in rebuilds)
    finally:
        alice("put", f"containers/{SERVER}/snapshot-schedule", json={"schedule": ""})
        asyncio.run(lxd.delete_instance(name))
        asyncio.run(lxd.delete_volume("lxcgpu", volume))


def test_an_admin_removes_a_user(hub, clients, lxd, ldap_directory, tmp_path):
    """Remove a user: their tokens revoked, keys and forwards gone (from the
    container too), the container stopped and kept; then deleted.  Only an
    admin, never themselves, and only with a choice about the containers."""
    from tests.integration.test_hub_login import login
    s, r = login(hub, "carol", ldap_directory.passwords["carol"])
    assert r.status_code == 302, r.text
    admin = Client(hub, make_token(hub, "carol"))
    zoe = Client(hub, make_token(hub, "zoe"))
    _, pub = keypair(tmp_path, "zoe")
    assert zoe("post", "keys", json={"key": pub}).status_code == 201
    r = zoe("post", f"containers/{SERVER}")
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    try:
        assert zoe("post", f"containers/{SERVER}/forwards", json={"port": 8080}
                   ).status_code == 201
        assert clients[ALICE]("delete", "admin/users/zoe?containers=keep").status_code == 403
        r = admin("delete", "admin/users/zoe")
        assert r.status_code == 400 and "containers=keep" in r.json()["message"]
        r = admin("delete", "admin/users/carol?containers=keep")
        assert r.status_code == 409 and "yourself" in r.json()["message"]
        assert admin("delete", "admin/users/nobody-here?containers=keep").status_code == 404
        assert zoe("get", "me").status_code == 200

        r = admin("delete", "admin/users/zoe?containers=keep")
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["keys_removed"] == 1 and out["forwards_removed"] == 1
        assert out["hub"]["tokens_revoked"] >= 1
        assert out["containers"] == [{"server": SERVER, "status": "stopped, kept",
                                      "detail": ""}]
        with hub.session() as s:
            r = s.get(f"{hub.url}/hub/api/user", headers={"Authorization": f"token {zoe.token}"},
                      timeout=30)
        assert r.status_code in (401, 403), r.text
        assert zoe("get", "me").status_code in (401, 403)
        inst = asyncio.run(lxd.instance(name))
        assert inst["status"] == "Stopped"
        assert not [k for k in inst["config"] if k.startswith("user.lxcgpu.forward.")]
        assert asyncio.run(lxd.get_file(name, "/home/zoe/.ssh/authorized_keys")) == b""
        audit = admin("get", "admin/audit?user=zoe&q=user.remove&limit=20").json()
        assert {a["action"] for a in audit} >= {"user.remove", "user.remove.hub",
                                                "user.remove.container"}
        assert all(a["actor"] == "carol" for a in audit)
        r = admin("delete", "admin/users/zoe?containers=delete")
        assert r.status_code == 200, r.text
        assert r.json()["containers"][0]["status"] == "deleted"
        assert asyncio.run(lxd.instance(name)) is None
    finally:
        asyncio.run(lxd.delete_instance(name))
