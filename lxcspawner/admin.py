"""``lxcgpu-admin``: the sysadmin's command for users, keys, forwards and
containers, until the web portal lands.

It reads the site settings (``--config`` or ``$LXCGPU_CONFIG``, else
``/etc/lxcgpu/lxcgpu.toml``), works on the store they name and on the LXD
of each GPU server they list (:mod:`lxcspawner.fleet` applies a user's
change on every server and reports each one), and records every change in the audit log as
``admin:<login>``.  Output is a table for people and JSON with ``--json``.
Errors are one line on stderr and exit status 1 (2 for a bad command line).
SSH keys are read from a file or stdin, never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pwd
import sys
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from . import lifecycle, naming, trust
from .container import home_volume
from .fleet import Fleet, ServerResult, summary
from .lxd import LXD, LXDError
from .settings import Settings
from .store import KeyRecord, Store, StoreError, key_fingerprint

PROG = "lxcgpu-admin"
T = TypeVar("T")


class CommandError(Exception):
    """A failure to report as one line, exit status 1."""


def current_actor() -> str:
    """``admin:<login>``: whoever ran sudo, else the effective user."""
    login = os.environ.get("SUDO_USER")
    if not login:
        try:
            login = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            login = str(os.geteuid())
    return f"admin:{login}"


# ---------------------------------------------------------------- output

def _plain(value: Any) -> Any:
    """Records and times as JSON values."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned columns under upper-case headers; '(none)' when empty."""
    if not rows:
        return "(none)"
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs)


def key_type(rec: KeyRecord) -> str:
    return rec.key.split(" ", 1)[0]


# ---------------------------------------------------------------- context

@dataclass
class Context:
    settings: Settings
    json: bool
    actor: str = field(default_factory=current_actor)
    _store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = self.settings.open_store()
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def emit(self, data: Any, text: str) -> None:
        print(json.dumps(_plain(data), indent=2) if self.json else text)

    def note(self, text: str) -> None:
        """Progress and hints: stderr, so stdout stays the result."""
        if not self.json:
            print(text, file=sys.stderr)

    def with_lxd(self, server: str, fn: Callable[[LXD], Awaitable[T]]) -> T:
        """Run ``fn`` with GPU server ``server``'s LXD."""
        async def go() -> T:
            # No retries: a one-shot command reports an unreachable LXD at once.
            lxd = self.settings.open_lxd(server, retries=0)
            try:
                return await fn(lxd)
            finally:
                lxd.close()
        return asyncio.run(go())

    def on_every_server(self, fn: Callable[[Fleet], Awaitable[T]]) -> T:
        """Run ``fn`` with the site's fleet of GPU servers (one result each)."""
        async def go() -> T:
            fleet = Fleet(self.settings, self.store, actor=self.actor)
            try:
                return await fn(fleet)
            finally:
                fleet.close()
        return asyncio.run(go())


def _server(ctx: Context, args) -> str:
    """``--server`` if it names a server of the site, else the default one."""
    return ctx.settings.gpu_server(args.server).name


def _new_user_note(ctx: Context, user: str, existed: bool) -> None:
    if not existed:
        rec = ctx.store.user(user)
        ctx.note(f"new user {user}: SSH port {rec.ssh_port}, id base {rec.idmap_base}")


# ---------------------------------------------------------------- users

def cmd_user_add(ctx: Context, args) -> None:
    existed = ctx.store.get_user(args.name) is not None
    rec = ctx.store.ensure_user(args.name, actor=ctx.actor)
    # The id base an admin is shown here may be used outside lxcgpu (a NAS
    # home owned by base + 1000): it stays the user's, never swapped for a
    # prebuilt container's (lxcspawner.pool).
    ctx.store.mark_idmap_used(rec.name)
    rec = ctx.store.user(rec.name)
    login = naming.posix_name(rec.name)
    ctx.emit({**_plain(rec), "login": login, "new": not existed}, fields([
        ("user", rec.name), ("ssh port", rec.ssh_port), ("id base", rec.idmap_base),
        ("login", login), ("created", rec.created),
        ("status", "already registered" if existed else "added")]))


def cmd_user_show(ctx: Context, args) -> None:
    rec = ctx.store.user(args.name)
    keys = ctx.store.list_keys(rec.name)
    fwds = ctx.store.list_forwards(user=rec.name)
    login = naming.posix_name(rec.name)
    base = str(rec.idmap_base) if rec.idmap_used else (
        f"{rec.idmap_base} (until their first container, which may bring another; "
        "`user add` fixes it)")
    text = fields([("user", rec.name), ("ssh port", rec.ssh_port), ("id base", base),
                   ("login", login), ("created", rec.created),
                   ("ssh", f"ssh -p {rec.ssh_port} {login}@<server>")])
    text += "\n\nkeys:\n" + _keys_table(keys) + "\n\nforwards:\n" + _forwards_table(fwds)
    ctx.emit({**_plain(rec), "login": login, "keys": keys, "forwards": fwds}, text)


def cmd_user_list(ctx: Context, args) -> None:
    users = ctx.store.list_users()
    ctx.emit(users, table([(u.name, u.ssh_port, u.idmap_base, u.created) for u in users],
                          ["USER", "SSH PORT", "ID BASE", "CREATED"]))


# ---------------------------------------------------------------- keys

def _read_keys(source: str) -> list[tuple[int, str]]:
    """(line number, key line) for every key in ``source`` (a file or ``-``);
    every one is validated before any is returned."""
    if source == "-":
        if sys.stdin.isatty():
            print("paste the public key(s), one per line, then Ctrl-D", file=sys.stderr)
        text, where = sys.stdin.read(), "stdin"
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise CommandError(f"{source}: not a text file of public keys") from None
        except OSError as e:
            raise CommandError(f"{source}: {e.strerror or e}") from None
        where = source
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key_fingerprint(line)
        except StoreError as e:
            # The line itself is never echoed: it may be a private key.
            raise CommandError(f"{where} line {n}: {e} Nothing was added.") from None
        keys.append((n, line))
    if not keys:
        raise CommandError(f"{where}: no public key found (one per line, as in a .pub file)")
    return keys


def _keys_table(keys: Sequence[KeyRecord]) -> str:
    return table([(k.id, k.fingerprint, key_type(k), k.comment or None, k.created)
                  for k in keys], ["ID", "FINGERPRINT", "TYPE", "COMMENT", "ADDED"])


def cmd_key_add(ctx: Context, args) -> None:
    lines = _read_keys(args.file)
    existed = ctx.store.get_user(args.name) is not None
    before = {k.fingerprint for k in ctx.store.list_keys(args.name)} if existed else set()
    added: list[KeyRecord] = []
    result = []
    try:
        for n, line in lines:
            rec = ctx.store.add_key(args.name, line, actor=ctx.actor)
            new = rec.fingerprint not in before and rec not in added
            if new:
                added.append(rec)
            result.append({**_plain(rec), "line": n, "added": new})
    except StoreError as e:
        # All or nothing: take back what this run added.
        for rec in added:
            ctx.store.remove_key(args.name, rec.id, actor=ctx.actor)
        raise CommandError(f"line {n}: {e} Nothing was added.") from None
    _new_user_note(ctx, args.name, existed)
    ctx.emit(result, table(
        [(r["id"], r["fingerprint"], r["comment"] or None,
          "added" if r["added"] else "already there") for r in result],
        ["ID", "FINGERPRINT", "COMMENT", "STATUS"]))
    if added:
        ctx.note(_push_keys(ctx, args.name))


def cmd_key_list(ctx: Context, args) -> None:
    ctx.store.user(args.name)
    keys = ctx.store.list_keys(args.name)
    ctx.emit(keys, _keys_table(keys))


def cmd_key_remove(ctx: Context, args) -> None:
    rec = ctx.store.remove_key(args.name, args.key, actor=ctx.actor)
    ctx.emit(rec, f"removed key {rec.id} {rec.fingerprint} {rec.comment}".rstrip())
    ctx.note(_push_keys(ctx, args.name))


def _push_keys(ctx: Context, user: str) -> str:
    """Put the user's keys into their containers on every GPU server; say,
    per server, what happened.  The store change stands either way."""
    results = ctx.on_every_server(lambda fleet: fleet.sync_user(user))
    return _results_note(results, user)


def _results_note(results: Sequence[ServerResult], user: str) -> str:
    text = summary(results)
    if not all(r.ok for r in results):
        text += (f"\nthe store has the change: a container gets it at its next start, or "
                 f"run `{PROG} container sync {user}` once its server is back")
    return text


# ---------------------------------------------------------------- forwards

def _forwards_table(fwds) -> str:
    return table([(f.user, f.server, f.host_port, f.container_port, f.proto, f.created)
                  for f in fwds], ["USER", "SERVER", "HOST PORT", "CONTAINER PORT", "PROTO",
                                   "CREATED"])


def _push_port_maps(ctx: Context, user: str, server: str) -> dict:
    """Write the user's port maps into their container on ``server``; say
    what happened.  The store change stands either way."""
    [res] = ctx.on_every_server(lambda fleet: fleet.sync_port_maps(user, [server]))
    return {"server": res.server, "status": res.status,
            "note": _results_note([res], user)}


def cmd_forward_add(ctx: Context, args) -> None:
    server = _server(ctx, args)
    existed = ctx.store.get_user(args.name) is not None
    rec = ctx.store.add_forward(args.name, server, args.port, actor=ctx.actor,
                                host_port=args.host_port)
    _new_user_note(ctx, args.name, existed)
    container = _push_port_maps(ctx, args.name, server)
    ctx.emit({"forward": rec, "container": container},
             f"{rec.user}: {rec.server}:{rec.host_port} -> container port "
             f"{rec.container_port}/{rec.proto}\n{container['note']}")


def cmd_forward_list(ctx: Context, args) -> None:
    if args.name is not None:
        ctx.store.user(args.name)
    fwds = ctx.store.list_forwards(user=args.name, server=args.server)
    ctx.emit(fwds, _forwards_table(fwds))


def cmd_forward_remove(ctx: Context, args) -> None:
    server = _server(ctx, args)
    which = {"host_port": args.port} if args.host_port else {"container_port": args.port}
    rec = ctx.store.remove_forward(args.name, server, actor=ctx.actor, **which)
    container = _push_port_maps(ctx, args.name, server)
    ctx.emit({"forward": rec, "container": container},
             f"{rec.user}: removed {rec.server}:{rec.host_port} -> container port "
             f"{rec.container_port}/{rec.proto}\n{container['note']}")


# ---------------------------------------------------------------- containers

def _audited(ctx: Context, action: str, user: str, detail: dict, fn: Callable[[], T]) -> T:
    """Run ``fn`` and record it, failed or not, in the audit log."""
    try:
        result = fn()
    except (LXDError, StoreError, ValueError) as e:
        ctx.store.audit(ctx.actor, action, user, {**detail, "error": str(e)}, ok=False)
        raise
    ctx.store.audit(ctx.actor, action, user, detail)
    return result


def cmd_container_up(ctx: Context, args) -> None:
    server = _server(ctx, args)

    async def up(lxd: LXD) -> lifecycle.UserContainer:
        return await lifecycle.ensure_user_container(
            lxd, ctx.store, ctx.settings, args.name, server, actor=ctx.actor,
            progress=lambda msg: ctx.note(f"{msg} ..."))
    uc = _audited(ctx, "container.up", args.name, {"server": server},
                  lambda: ctx.with_lxd(server, up))
    text = fields([("container", uc.name), ("address", uc.address),
                   ("ssh", uc.ssh_command)] +
                  [(f"forward {h}", f"{uc.server}:{h} -> container port {p}")
                   for h, p in sorted(uc.forwards.items())])
    ctx.emit({**_plain(uc), "ssh_command": uc.ssh_command}, text)


def cmd_container_sync(ctx: Context, args) -> None:
    servers = [_server(ctx, args)] if args.server else None
    results = ctx.on_every_server(lambda fleet: fleet.sync_user(args.name, servers))
    ctx.store.audit(ctx.actor, "container.sync", args.name,
                    {"servers": {r.server: r.status for r in results}},
                    ok=all(r.ok for r in results))
    ctx.emit(results, _results_note(results, args.name))
    if not all(r.ok for r in results):
        bad = [r.server for r in results if not r.ok]
        raise CommandError(f"{args.name}'s containers on {', '.join(bad)} are not up to date "
                           "(see above)")


def cmd_container_delete(ctx: Context, args) -> None:
    server = _server(ctx, args)
    name = naming.instance_name(args.name, server, ctx.settings.instance_prefix)
    if not args.yes:
        raise ValueError(f"deleting {name} deletes everything in it ({args.name}'s files"
                         f"{'' if args.keep_home else ', their home included'}, installed "
                         "packages, running jobs); run again with --yes to do it")

    async def delete(lxd: LXD) -> bool:
        return await lifecycle.delete_user_container(
            lxd, ctx.store, args.name, server, prefix=ctx.settings.instance_prefix,
            actor=ctx.actor, keep_home=args.keep_home)
    existed = _audited(ctx, "container.delete", args.name,
                       {"server": server, "keep_home": args.keep_home},
                       lambda: ctx.with_lxd(server, delete))
    ctx.emit({"container": name, "deleted": existed},
             fields([("container", name),
                     ("deleted", "yes; its address is free again" if existed
                      else "there was none (its address, if any, is free again)"),
                     ("home", f"kept (volume {home_volume(name)}; a container made again "
                              "gets it back)" if args.keep_home else "deleted with it")]))


# ---------------------------------------------------------------- audit

# ---------------------------------------------------------------- servers

def _read_token(stream=None) -> str:
    """The trust token from stdin: pasted at a prompt (not echoed) or piped;
    never from the command line."""
    stream = stream or sys.stdin
    if stream.isatty():
        import getpass
        return getpass.getpass("trust token (from setup/gpu-server on the GPU server): ")
    return stream.read(65536)


def cmd_server_trust(ctx: Context, args) -> None:
    server = ctx.settings.gpu_server(args.server_name)
    token = trust.TrustToken.parse(_read_token())
    result = _audited(ctx, "server.trust", f"server:{server.name}",
                      {"endpoint": server.lxd, "fingerprint": token.fingerprint},
                      lambda: asyncio.run(trust.join(server, token)))
    lines = [f"{server.name}: its certificate (SHA-256 {result.fingerprint}) is pinned in "
             f"{result.server_cert}"]
    if result.client_cert_made:
        lines.append(f"made the hub's LXD client certificate {server.client_cert} "
                     f"(key {server.client_key}, root only)")
    lines.append(f"{server.name} trusted this hub already" if result.already_trusted else
                 f"{server.name} trusts this hub now ({trust.HUB_CLIENT_NAME})")
    lines.append(f"next: restart the hub; `lxcgpu-admin container up USER --server "
                 f"{server.name}` checks the path end to end")
    ctx.emit(result, "\n".join(lines))


def cmd_server_list(ctx: Context, args) -> None:
    async def probe(server) -> dict:
        row = {"name": server.name, "lxd": server.lxd or "local socket",
               "address": server.ssh_host}
        lxd = server.open_lxd(timeout=10, retries=0)
        try:
            info = await lxd.server_info()
            row["state"] = "trusted" if info.get("auth") == "trusted" else "NOT trusted"
            row["lxd_version"] = (info.get("environment") or {}).get("server_version")
        except (LXDError, ValueError, OSError) as e:
            row["state"] = f"unreachable: {e}"
        finally:
            lxd.close()
        return row

    async def every() -> list[dict]:
        return list(await asyncio.gather(*(probe(g) for g in ctx.settings.servers)))
    rows = asyncio.run(every())
    ctx.emit(rows, table([(r["name"], r["lxd"], r["address"], r["state"]) for r in rows],
                         ["server", "lxd", "ssh address", "state"]))


def cmd_audit(ctx: Context, args) -> None:
    entries = ctx.store.audit_log(user=args.user, limit=args.limit)
    ctx.emit(entries, table([(e.time, e.actor, e.action, e.target, e.ok, e.detail)
                             for e in entries],
                            ["TIME", "ACTOR", "ACTION", "TARGET", "OK", "DETAIL"]))


# ---------------------------------------------------------------- arguments

def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


NAME = {"metavar": "NAME", "help": "the user's hub (LDAP) name"}


def build_parser() -> argparse.ArgumentParser:
    # --json and --config work before or after the subcommand: the leaves
    # repeat them with SUPPRESS defaults, so they never overwrite the top's.
    # (Parents share their action objects: the top gets its own.)
    def global_options(default):
        g = argparse.ArgumentParser(add_help=False)
        g.add_argument("--json", action="store_true",
                       default=False if default is None else default,
                       help="print JSON for scripts instead of tables")
        g.add_argument("--config", metavar="FILE", default=default,
                       help="settings file (default: $LXCGPU_CONFIG, else "
                            "/etc/lxcgpu/lxcgpu.toml)")
        g.add_argument("-v", "--verbose", action="store_true",
                       default=False if default is None else default,
                       help="log what is done")
        return g

    common = global_options(argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog=PROG, parents=[global_options(None)], description=(
        "Manage lxcgpu users, SSH keys, port forwards and containers."))
    groups = p.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def leaf(sub, name, func, help):
        q = sub.add_parser(name, parents=[common], help=help, description=help)
        q.set_defaults(func=func)
        return q

    def server_opt(q):
        q.add_argument("--server", metavar="S", help="GPU server name (default: the "
                       "site's first, [servers.<name>])")

    user = groups.add_parser("user", help="users: SSH port and id block").add_subparsers(
        dest="cmd", metavar="ACTION", required=True)
    leaf(user, "add", cmd_user_add, "register a user: allocate their SSH port and "
         "id block").add_argument("name", **NAME)
    leaf(user, "show", cmd_user_show, "a user's ports, keys and forwards").add_argument(
        "name", **NAME)
    leaf(user, "list", cmd_user_list, "all users")

    key = groups.add_parser("key", help="users' SSH public keys").add_subparsers(
        dest="cmd", metavar="ACTION", required=True)
    q = leaf(key, "add", cmd_key_add, "add public keys from FILE or stdin, one per line "
             "(all or none)")
    q.add_argument("name", **NAME)
    q.add_argument("file", nargs="?", default="-", metavar="FILE",
                   help="a .pub or authorized_keys file; - or nothing: stdin")
    leaf(key, "list", cmd_key_list, "a user's keys").add_argument("name", **NAME)
    q = leaf(key, "remove", cmd_key_remove, "remove a key")
    q.add_argument("name", **NAME)
    q.add_argument("key", metavar="FINGERPRINT|ID")

    fwd = groups.add_parser("forward", help="port forwards to containers").add_subparsers(
        dest="cmd", metavar="ACTION", required=True)
    q = leaf(fwd, "add", cmd_forward_add, "forward a free host port to a container port")
    q.add_argument("name", **NAME)
    q.add_argument("port", type=_port, metavar="PORT", help="the port inside the container")
    q.add_argument("--host-port", type=_port, metavar="N",
                   help="this host port (default: the lowest free one in the forward range)")
    server_opt(q)
    q = leaf(fwd, "list", cmd_forward_list, "forwards (of one user, on one server)")
    q.add_argument("name", nargs="?", **NAME)
    q.add_argument("--server", metavar="S", help="only this GPU server's")
    q = leaf(fwd, "remove", cmd_forward_remove, "remove a forward")
    q.add_argument("name", **NAME)
    q.add_argument("port", type=_port, metavar="PORT",
                   help="its container port (with --host-port: its host port)")
    q.add_argument("--host-port", action="store_true", help="PORT is the host port")
    server_opt(q)

    ctr = groups.add_parser("container", help="users' containers on the GPU servers"
                            ).add_subparsers(dest="cmd", metavar="ACTION", required=True)
    q = leaf(ctr, "up", cmd_container_up, "create, start and prepare a user's container")
    q.add_argument("name", **NAME)
    server_opt(q)
    q = leaf(ctr, "sync", cmd_container_sync, "push a user's keys and port maps into "
             "their containers on every GPU server")
    q.add_argument("name", **NAME)
    q.add_argument("--server", metavar="S", help="only on this GPU server")
    q = leaf(ctr, "delete", cmd_container_delete, "delete a user's container and all in it "
             "(their SSH port, keys and forwards stay theirs)")
    q.add_argument("name", **NAME)
    q.add_argument("--yes", action="store_true", help="really delete it")
    q.add_argument("--keep-home", action="store_true", help="keep their home volume (where "
                   "the container was rebuilt once): a container made again gets it back")
    server_opt(q)

    srv = groups.add_parser("server", help="the GPU servers of the site file"
                            ).add_subparsers(dest="cmd", metavar="ACTION", required=True)
    leaf(srv, "list", cmd_server_list, "each GPU server: its LXD, SSH address, and whether "
         "it is reachable and trusts this hub")
    leaf(srv, "trust", cmd_server_trust, "pin a GPU server's certificate and make it trust "
         "this hub, with the token setup/gpu-server printed there (read from stdin)"
         ).add_argument("server_name", metavar="SERVER", help="its [servers.<name>]")

    q = groups.add_parser("audit", parents=[common], help="the audit log, newest first",
                          description="the audit log, newest first")
    q.set_defaults(func=cmd_audit)
    q.add_argument("--user", metavar="NAME", help="only entries about this user")
    q.add_argument("--limit", type=_positive, default=50, metavar="N",
                   help="at most N entries (default 50)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format=f"{PROG}: %(message)s")
    ctx = None
    try:
        ctx = Context(Settings.load(args.config), json=args.json)
        args.func(ctx, args)
        return 0
    except (CommandError, StoreError, LXDError, ValueError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except SQLAlchemyError as e:
        url = ctx.settings.store_url if ctx else "?"
        print(f"{PROG}: the store at {url} failed: {getattr(e, 'orig', None) or e}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if ctx is not None:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main())
