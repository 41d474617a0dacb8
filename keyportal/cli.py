#!/usr/bin/env python3
"""``lxcgpu``: your containers on the lab's GPU servers, from your laptop.

A client of keyportal's REST API in one file, standard library only (it runs
wherever Python 3.9+ does).  Your hub serves it::

    curl -fsSLo ~/.local/bin/lxcgpu https://HUB/services/keyportal/lxcgpu
    chmod +x ~/.local/bin/lxcgpu

Then::

    lxcgpu login https://hub.lab.example.org:8000   # asks for a token from the hub's token page
    lxcgpu status
    lxcgpu start gpu17 / lxcgpu stop gpu17
    lxcgpu snapshot gpu17 [NAME] / lxcgpu snapshots gpu17
    lxcgpu restore gpu17 NAME / lxcgpu delete-snapshot gpu17 NAME
    lxcgpu schedule gpu17 @daily 7 / lxcgpu schedule gpu17 off
    lxcgpu export gpu17 / lxcgpu operations
    lxcgpu forward gpu17 6006 / lxcgpu forwards gpu17 / lxcgpu unforward gpu17 6006
    lxcgpu gpus gpu17 / lxcgpu gpus gpu17 0,2 / lxcgpu gpus gpu17 all
    lxcgpu keys / lxcgpu keys add ~/.ssh/id_ed25519.pub / lxcgpu keys remove SHA256:...
    lxcgpu ssh-config >> ~/.ssh/config

The hub's URL, the token and (for a hub with its own CA) the CA file are kept
in ``~/.config/lxcgpu/config.json`` (0600); ``LXCGPU_HUB``, ``LXCGPU_TOKEN``
and ``LXCGPU_CA`` override them.  The token is never put on a command line
or in a URL.  Tables for people, ``--json`` for scripts; destructive actions
ask first (``--yes`` skips the question).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

PROG = "lxcgpu"
API = "/services/keyportal/api/v1/"
TIMEOUT = 600   # seconds: a container's first start or a restore can take minutes


class CLIError(Exception):
    """One line for the user; exit status 1."""


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lxcgpu" / "config.json"


def load_config() -> dict:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot read {path}: {e}; run `lxcgpu login URL` again") from None
    for key, var in (("hub", "LXCGPU_HUB"), ("token", "LXCGPU_TOKEN"), ("ca", "LXCGPU_CA")):
        if os.environ.get(var):
            data[key] = os.environ[var]
    return data


def save_config(data: dict) -> Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


class Portal:
    def __init__(self, hub: str, token: str, ca: str | None = None):
        self.base = hub.rstrip("/") + API
        self.token = token
        self.context = ssl.create_default_context(cafile=ca) if ca else None

    def call(self, method: str, path: str, body: Any = None, *, text: bool = False) -> Any:
        data = None
        headers = {"Authorization": f"token {self.token}", "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=self.context) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["message"]
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {e.code} {e.reason}"
            if e.code == 401:
                message += " (run `lxcgpu login URL` with a new token)"
            raise CLIError(message) from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise CLIError(f"the hub's certificate is not trusted ({reason.verify_message});"
                               " if your lab uses its own CA, `lxcgpu login URL --ca FILE`"
                               ) from None
            raise CLIError(f"cannot reach the hub at {self.base}: {reason}") from None
        return raw.decode() if text else json.loads(raw or b"null")


# ---------------------------------------------------------------- output

def table(rows: list[list[Any]], headers: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def per_server(results: list[dict]) -> str:
    return "\n".join(f"  {r['server']}: {r['status']}: {r['detail']}" for r in results)


def confirm(args, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CLIError(f"{question.rstrip('?')}: add --yes to confirm (no terminal to ask)")
    answer = input(f"{question} [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise CLIError("nothing done")


# ---------------------------------------------------------------- commands

def cmd_login(args, _cfg) -> None:
    hub = args.url.rstrip("/")
    parts = urllib.parse.urlsplit(hub)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise CLIError(f"{args.url!r} is not the hub's URL (https://HOST[:PORT])")
    print(f"Make a token at {hub}/hub/token (keep its scopes, or pick custom:keyportal:use "
          "and access:services!service=keyportal) and paste it here.", file=sys.stderr)
    token = (getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()).strip()
    if not token:
        raise CLIError("no token given")
    ca = str(Path(args.ca).resolve()) if args.ca else None
    me = Portal(hub, token, ca).call("GET", "me")
    path = save_config({"hub": hub, "token": token, **({"ca": ca} if ca else {})})
    print(f"logged in to {hub} as {me['name']} (login {me['login']}, SSH port "
          f"{me['ssh_port']}); kept in {path}")


def cmd_status(args, p: Portal) -> Any:
    me = p.call("GET", "me")
    rows = p.call("GET", "containers")
    return {"me": me, "containers": rows}, (
        f"{me['name']}: login {me['login']}, SSH port {me['ssh_port']} on every server\n\n"
        + table([[c["server"], c["state"], c["address"], c["ssh_command"] if c["exists"] else
                  c["detail"]] for c in rows], ["server", "state", "address", "ssh"]))


def cmd_start(args, p: Portal) -> Any:
    print(f"starting your container on {args.server} (a first start takes a minute) ...",
          file=sys.stderr)
    r = p.call("POST", f"containers/{q(args.server)}/start")
    return r, f"{r['name']} runs at {r['address']}: {r['ssh_command']}"


def cmd_stop(args, p: Portal) -> Any:
    confirm(args, f"Stop your container on {args.server} (everything running in it stops)?")
    r = p.call("POST", f"containers/{q(args.server)}/stop")
    return r, f"{r['name']} is stopped"


def cmd_snapshot(args, p: Portal) -> Any:
    r = p.call("POST", f"containers/{q(args.server)}/snapshots",
               {"name": args.name} if args.name else {})
    return r, f"snapshot {r['name']} of your container on {r['server']} made"


def cmd_snapshots(args, p: Portal) -> Any:
    rows = p.call("GET", f"containers/{q(args.server)}/snapshots")
    return rows, table([[s["name"], s["created_at"][:19].replace("T", " "),
                         _size(s.get("size")), "yes" if s.get("home", True) else "no"]
                        for s in rows], ["name", "made (UTC)", "size", "home"])


def cmd_restore(args, p: Portal) -> Any:
    confirm(args, f"Put your container on {args.server} back to snapshot {args.name} "
                  "(everything changed since is lost)?")
    print("restoring ...", file=sys.stderr)
    r = p.call("POST", f"containers/{q(args.server)}/snapshots/{q(args.name)}/restore")
    return r, (f"your container on {args.server} is back at {args.name}"
               + (" (the system only: your home was not part of that snapshot and is as it "
                  "was)" if r.get("home") == "unchanged" else ""))


def cmd_delete_snapshot(args, p: Portal) -> Any:
    confirm(args, f"Delete snapshot {args.name} of your container on {args.server}?")
    r = p.call("DELETE", f"containers/{q(args.server)}/snapshots/{q(args.name)}")
    return r, f"snapshot {args.name} deleted"


def cmd_schedule(args, p: Portal) -> Any:
    path = f"containers/{q(args.server)}/snapshot-schedule"
    if args.when is None:
        r = p.call("GET", path)
    elif args.when == "off":
        r = p.call("PUT", path, {"schedule": ""})
    else:
        if args.keep is None:
            raise CLIError(f"how many to keep? lxcgpu schedule {args.server} {args.when} 7")
        r = p.call("PUT", path, {"schedule": args.when, "keep": args.keep})
    text = (f"{r['server']}: snapshots {r['schedule']}, the newest {r['keep']} kept "
            "(named auto-...)" if r["schedule"] else f"{r['server']}: no scheduled snapshots")
    return r, text


def follow(args, p: Portal, op: dict) -> dict:
    """Poll a long operation until it ends, its steps on stderr; its result
    (``--no-wait``: the operation as it started)."""
    if args.no_wait:
        return op
    step = None
    while op["status"] == "running":
        if op["step"] != step:
            step = op["step"]
            print(f"  {step} ...", file=sys.stderr)
        op = p.call("GET", f"operations/{q(op['id'])}?wait=20")
    if op["status"] == "failed":
        raise CLIError(op["message"])
    return op["result"]


def _started(op: dict, what: str) -> str:
    return (f"{what} started: operation {op['id']}; follow it with "
            f"`lxcgpu operations` (status {op['status']})")


def cmd_rebuild(args, p: Portal) -> Any:
    confirm(args, f"Rebuild your container on {args.server}: a fresh system from the lab's "
                  "template? Your home, address, SSH port, keys and forwards stay; installed "
                  "packages, /usr/local, /etc and the container's snapshots are replaced, and "
                  "running programs stop.")
    print("rebuilding (a minute; longer the first time, when your home is copied into a "
          "volume of its own) ...", file=sys.stderr)
    r = follow(args, p, p.call("POST", f"containers/{q(args.server)}/rebuild"))
    if args.no_wait:
        return r, _started(r, "the rebuild")
    gone = r["snapshots_removed"]
    return r, (f"{r['name']} has a new system and runs at {r['address']}: {r['ssh_command']}"
               + (f"\nthe old system's snapshots went with it: {', '.join(gone)}"
                  if gone else ""))


def cmd_export(args, p: Portal) -> Any:
    print(f"exporting your container on {args.server} (minutes for a large one) ...",
          file=sys.stderr)
    r = follow(args, p, p.call("POST", f"containers/{q(args.server)}/export"))
    if args.no_wait:
        return r, _started(r, "the export")
    return r, (f"exported to {r['file']} ({_size(r['bytes'])}) on the lab's export folder"
               + (f"\nyour home to {r['home_file']} ({_size(r['home_bytes'])})"
                  if r.get("home_file") else ""))


def cmd_operations(args, p: Portal) -> Any:
    rows = p.call("GET", "operations")
    return rows, table([[o["id"], o["kind"], o["server"], o["status"],
                         o["message"] if o["status"] == "failed" else o["step"],
                         (o["created"] or "")[11:19], (o["finished"] or "")[11:19] or None]
                        for o in rows],
                       ["id", "what", "server", "status", "step", "started", "ended"])


def cmd_gpus(args, p: Portal) -> Any:
    path = f"containers/{q(args.server)}/gpus"
    if args.choice:
        r = p.call("PUT", path, {"gpus": "all" if args.choice == "all" else
                                 [c.strip() for c in args.choice.split(",") if c.strip()]})
    else:
        r = p.call("GET", path)
    if not r["gpus"]:
        return r, f"{r['server']} has no GPUs"
    which = "all of them" if r["choice"] == "all" else ", ".join(map(str, r["choice"]))
    return r, (f"{r['server']}: your container gets {which}\n\n"
               + table([[g["index"], "yes" if g["yours"] else "", g["model"],
                         g.get("memory") or "", g.get("now") or "", g["uuid"],
                         g["pci_address"]] for g in r["gpus"]],
                       ["gpu", "yours", "model", "memory", "now", "uuid", "pci"]))


def cmd_forward(args, p: Portal) -> Any:
    r = p.call("POST", f"containers/{q(args.server)}/forwards", {"port": args.port})
    f = r["forward"]
    return r, f"{args.server}:{f['host_port']} -> port {f['container_port']} of your container"


def cmd_forwards(args, p: Portal) -> Any:
    rows = p.call("GET", f"containers/{q(args.server)}/forwards")
    return rows, table([[f"{f['server']}:{f['host_port']}", f["container_port"], f["proto"]]
                        for f in rows], ["host port", "container port", "proto"])


def cmd_unforward(args, p: Portal) -> Any:
    r = p.call("DELETE", f"containers/{q(args.server)}/forwards/{args.port}")
    return r, f"forward of port {args.port} removed"


def cmd_keys(args, p: Portal) -> Any:
    if args.action == "add":
        if not args.arg:
            raise CLIError("which key? lxcgpu keys add ~/.ssh/id_ed25519.pub")
        try:
            text = Path(args.arg).expanduser().read_text()
        except OSError as e:
            raise CLIError(f"cannot read {args.arg}: {e.strerror}") from None
        r = p.call("POST", "keys", {"key": text})
        return r, (f"added {', '.join(k['fingerprint'] for k in r['added'])}\n"
                   + per_server(r["servers"]))
    if args.action == "remove":
        if not args.arg:
            raise CLIError("which key? lxcgpu keys remove SHA256:... (see lxcgpu keys)")
        confirm(args, f"Remove key {args.arg} from all your containers?")
        r = p.call("DELETE", "keys/" + q(args.arg))
        return r, f"removed {r['removed']['fingerprint']}\n" + per_server(r["servers"])
    rows = p.call("GET", "keys")
    return rows, table([[k["fingerprint"], k["type"], k["comment"], k["added"][:10]]
                        for k in rows], ["fingerprint", "type", "comment", "added"])


def cmd_ssh_config(args, p: Portal) -> Any:
    text = p.call("GET", "ssh-config" + (f"?identity={q(args.identity)}" if args.identity
                                          else ""), text=True)
    return {"ssh_config": text}, text.rstrip("\n")


def q(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _size(n) -> str:
    if not isinstance(n, int) or n < 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="JSON for scripts")
    common.add_argument("--yes", "-y", action="store_true", help="do not ask before "
                        "destructive actions")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(name, func, help, *, server=False):
        q_ = sub.add_parser(name, parents=[common], help=help, description=help)
        q_.set_defaults(func=func)
        if server:
            q_.add_argument("server", metavar="SERVER", help="a GPU server (lxcgpu status)")
        return q_

    q_ = leaf("login", cmd_login, "keep the hub's URL and a token made on its token page")
    q_.add_argument("url", metavar="URL")
    q_.add_argument("--ca", metavar="FILE", help="the lab's CA certificate, where the hub's "
                    "is not signed by a public one")
    leaf("status", cmd_status, "your SSH port and your container on each GPU server")
    leaf("start", cmd_start, "make or start your container", server=True)
    leaf("stop", cmd_stop, "stop your container", server=True)
    leaf("snapshot", cmd_snapshot, "snapshot your container", server=True).add_argument(
        "name", nargs="?", metavar="NAME", help="default: a time stamp")
    leaf("snapshots", cmd_snapshots, "your container's snapshots", server=True)
    leaf("restore", cmd_restore, "put your container back to a snapshot",
         server=True).add_argument("name", metavar="NAME")
    leaf("delete-snapshot", cmd_delete_snapshot, "delete a snapshot",
         server=True).add_argument("name", metavar="NAME")
    q_ = leaf("schedule", cmd_schedule, "scheduled snapshots: show, set (@hourly, @daily, "
              "@weekly and how many to keep) or turn off", server=True)
    q_.add_argument("when", nargs="?", choices=("@hourly", "@daily", "@weekly", "off"))
    q_.add_argument("keep", nargs="?", type=int, metavar="KEEP")
    for q_ in (leaf("rebuild", cmd_rebuild, "a fresh system from the lab's template; your "
                    "home stays", server=True),
               leaf("export", cmd_export, "an LXD backup of your container to the lab's "
                    "export folder", server=True)):
        q_.add_argument("--no-wait", action="store_true", help="start it and return (follow "
                        "it with `lxcgpu operations`)")
    leaf("operations", cmd_operations, "your rebuilds and exports: running, and ended in the "
         "last hour")
    q_ = leaf("gpus", cmd_gpus, "the server's GPUs, and which your container gets (all, or "
              "a choice: lxcgpu gpus gpu17 0,2)", server=True)
    q_.add_argument("choice", nargs="?", metavar="all|LIST", help="all, or GPU indexes / "
                    "UUIDs, comma-separated")
    leaf("forward", cmd_forward, "expose a port of your container on the server",
         server=True).add_argument("port", type=int, metavar="PORT")
    leaf("forwards", cmd_forwards, "your forwards on a server", server=True)
    leaf("unforward", cmd_unforward, "remove a forward", server=True).add_argument(
        "port", type=int, metavar="PORT", help="its port inside the container")
    q_ = leaf("keys", cmd_keys, "your SSH keys (add FILE, remove FINGERPRINT)")
    q_.add_argument("action", nargs="?", choices=("list", "add", "remove"), default="list")
    q_.add_argument("arg", nargs="?", metavar="FILE|FINGERPRINT")
    leaf("ssh-config", cmd_ssh_config, "a ~/.ssh/config entry per GPU server").add_argument(
        "--identity", metavar="PATH", help="an IdentityFile line, e.g. ~/.ssh/id_ed25519")
    return p


_getaddrinfo = socket.getaddrinfo


def _localhost_is_loopback(host, *args, **kwargs):
    """``*.localhost`` is this machine (RFC 6761), as browsers and curl have
    it: the demo hub's https://lxcgpu.localhost:8000, here or through an SSH
    tunnel, without a line in /etc/hosts."""
    if isinstance(host, str) and host.rstrip(".").lower().endswith(".localhost"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *args, **kwargs)


def main(argv=None) -> int:
    socket.getaddrinfo = _localhost_is_loopback
    args = build_parser().parse_args(argv)
    try:
        if args.func is cmd_login:
            cmd_login(args, None)
            return 0
        cfg = load_config()
        if not cfg.get("hub") or not cfg.get("token"):
            raise CLIError("not logged in: lxcgpu login https://YOUR-HUB")
        data, text = args.func(args, Portal(cfg["hub"], cfg["token"], cfg.get("ca")))
        print(json.dumps(data, indent=1) if args.json else text)
        return 0
    except CLIError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
