"""keyportal's pages: keys and containers, server-rendered in the hub's look.

The browser logs in through the hub (HubOAuth); every form carries
JupyterHub's XSRF token; a change answers with a redirect back to the page
and a one-time message (a signed cookie), so a reload never repeats it.
Destructive actions (stop, restore, delete a snapshot, remove a key) need
their confirmation box ticked; the server checks it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import quote

import jinja2
from jupyterhub.services.auth import HubOAuthenticated
from tornado import web

from lxcspawner.lxd import LXDError
from lxcspawner.store import StoreError

from hub_config.portal import ADMIN_SCOPE

from .portal import AUTO_PREFIX, MAX_BODY, Portal, PortalError, _refusal

log = logging.getLogger("keyportal")

TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
    autoescape=True)
FLASH = "keyportal-flash"


class PageHandler(HubOAuthenticated, web.RequestHandler):
    """A page for the logged-in user (the hub's login when there is none)."""

    @property
    def portal(self) -> Portal:
        return self.settings["portal"]

    def prepare(self):
        if len(self.request.body or b"") > MAX_BODY:
            raise web.HTTPError(413, f"larger than {MAX_BODY // 1024} KiB")

    @property
    def prefix(self) -> str:
        return self.settings["prefix"]

    @property
    def user(self) -> str:
        return self.current_user["name"]

    @property
    def is_admin(self) -> bool:
        """A hub administrator, or a session whose scopes carry the portal's
        admin scope (the API also takes custom:keyportal:admin tokens)."""
        return bool(self.current_user.get("admin")) or \
            ADMIN_SCOPE in (self.current_user.get("scopes") or ())

    def render_page(self, name: str, **values) -> None:
        flash = self.get_signed_cookie(FLASH, max_age_days=1)
        if flash:
            self.clear_cookie(FLASH, path=self.prefix)
        hub = self.settings["hub_prefix"]
        self.set_header("Cache-Control", "no-store")
        self.finish(TEMPLATES.get_template(name).render(
            user=self.current_user, prefix=self.prefix, hub=hub, xsrf=self.xsrf_token.decode()
            if isinstance(self.xsrf_token, bytes) else self.xsrf_token,
            flash=json.loads(flash) if flash else None, quote=quote, is_admin=self.is_admin,
            **values))

    def done(self, message: str, ok: bool = True, results: list | None = None, *,
             to: str = "") -> None:
        self.set_signed_cookie(FLASH, json.dumps({"ok": ok, "message": message,
                                                  "results": results or []}),
                               path=self.prefix, httponly=True,
                               secure=self.request.protocol == "https", samesite="Strict",
                               expires_days=None)
        self.redirect(self.prefix + to)

    def confirmed(self) -> bool:
        return self.get_body_argument("confirm", "") == "yes"

    async def act(self, coro, ok_message, *, to: str = "") -> None:
        try:
            result = await coro
        except (PortalError, LXDError, StoreError, ValueError) as e:
            self.done(str(_refusal(e)), ok=False, to=to)
            return
        self.done(ok_message(result) if callable(ok_message) else ok_message,
                  results=result.get("servers") if isinstance(result, dict) else None, to=to)


class HomeHandler(PageHandler):
    @web.authenticated
    async def get(self):
        try:
            me = await self.portal.me(self.user)
            keys = await self.portal.keys(self.user)
        except PortalError as e:
            raise web.HTTPError(e.status, str(e)) from None
        containers = await self.portal.containers(self.user)
        for c in containers:
            c["snapshots"], c["forwards"] = [], []
            c["schedule"] = {}
            if c["exists"]:
                try:
                    c["snapshots"] = await self.portal.snapshots(self.user, c["server"])
                    c["schedule"] = await self.portal.snapshot_schedule(self.user, c["server"])
                    c["made_by_hand"] = sum(not x["name"].startswith(AUTO_PREFIX)
                                            for x in c["snapshots"])
                    c["gpus"] = await self.portal.gpus(self.user, c["server"])
                except (PortalError, LXDError) as e:
                    c["detail"] = str(_refusal(e))
            c["forwards"] = await self.portal.forwards(self.user, c["server"])
            c["operations"] = [op_view(op) for op in self.portal.operations.of(self.user)
                               if op.server == c["server"]][:3]
        self.render_page("home.html", me=me, keys=keys, containers=containers,
                         snapshot_limit=self.portal.snapshot_limit,
                         export_on=bool(self.portal.settings.export_dir))


class KeyAddPage(PageHandler):
    @web.authenticated
    async def post(self):
        text = self.get_body_argument("key", "")
        upload = self.request.files.get("keyfile")
        if upload:
            try:
                text += "\n" + upload[0]["body"].decode("utf-8")
            except UnicodeDecodeError:
                self.done("that file is not a text public key", ok=False)
                return
        await self.act(self.portal.add_keys(self.user, text, actor=self.user,
                                            source=self.request.remote_ip),
                       lambda r: "key added: " + ", ".join(k["fingerprint"] for k in r["added"]))


class KeyRemovePage(PageHandler):
    @web.authenticated
    async def post(self):
        fp = self.get_body_argument("fingerprint", "")
        if not self.confirmed():
            self.done("tick the box to confirm removing that key", ok=False)
            return
        await self.act(self.portal.remove_key(self.user, fp, actor=self.user,
                                              source=self.request.remote_ip),
                       f"key {fp} removed")


class ContainerPage(PageHandler):
    """One POST per action on one server's card."""

    @web.authenticated
    async def post(self, server: str, action: str):
        who = {"actor": self.user, "source": self.request.remote_ip}
        arg = self.get_body_argument
        destructive = action in ("stop", "restore", "delete-snapshot", "rebuild")
        if destructive and not self.confirmed():
            self.done(f"tick the box to confirm: {action.replace('-', ' ')}", ok=False)
            return
        p, u = self.portal, self.user
        if action in ("start", "stop"):
            await self.act(p.set_state(u, server, action, **who),
                           f"your container on {server}: {action} done")
        elif action == "snapshot":
            await self.act(p.snapshot(u, server, arg("name", "").strip() or None, **who),
                           lambda r: f"snapshot {r['name']} made")
        elif action == "restore":
            name = arg("name", "")
            await self.act(p.restore(u, server, name, **who),
                           f"your container on {server} is back at {name}")
        elif action == "delete-snapshot":
            name = arg("name", "")
            await self.act(p.delete_snapshot(u, server, name, **who), f"snapshot {name} deleted")
        elif action == "schedule":
            keep = arg("keep", "").strip()
            await self.act(p.set_snapshot_schedule(
                u, server, arg("schedule", ""), int(keep) if keep.isdigit() else keep or None,
                **who), lambda r: (f"automatic snapshots {r['schedule'][1:]}, the newest "
                                   f"{r['keep']} kept" if r["schedule"]
                                   else "no automatic snapshots"))
        elif action == "rebuild":
            await self.act(p.rebuild(u, server, **who),
                           f"rebuilding your container on {server}: follow it on its card")
        elif action == "export":
            await self.act(p.export(u, server, **who),
                           f"exporting your container on {server}: follow it on its card")
        elif action == "gpus":
            await self.act(p.set_gpus(u, server, arg("gpus", "").strip() or "all", **who),
                           lambda r: f"your container on {server} gets "
                                     + ("every GPU of the server" if r["choice"] == "all"
                                        else "GPU " + ", ".join(map(str, r["choice"]))))
        elif action == "forward":
            await self.act(p.add_forward(u, server, arg("port", ""), **who),
                           lambda r: f"{server}:{r['forward']['host_port']} now reaches port "
                                     f"{r['forward']['container_port']} of your container")
        elif action == "unforward":
            await self.act(p.remove_forward(u, server, arg("port", ""), **who),
                           "forward removed")
        else:
            raise web.HTTPError(404)


def op_view(op) -> dict:
    """An operation as its card shows it: the JSON plus one sentence."""
    view = op.json()
    r = op.result or {}
    if op.status == "running":
        view["sentence"] = f"{op.step} ..."
    elif op.status == "failed":
        view["sentence"] = op.message
    elif op.kind == "rebuild":
        gone = r.get("snapshots_removed") or []
        view["sentence"] = ("a new system; your home is as it was"
                            + (f" (the old system's snapshots went with it: {', '.join(gone)})"
                               if gone else ""))
    elif op.kind == "export":
        view["sentence"] = (f"written to {r.get('file')} ({(r.get('bytes') or 0) // 2**20} MiB)"
                            + (f" and your home to {r['home_file']} "
                               f"({(r.get('home_bytes') or 0) // 2**20} MiB)"
                               if r.get("home_file") else ""))
    else:
        view["sentence"] = op.status
    return view


class OperationPage(PageHandler):
    """An operation for the page's script (the browser session; the API
    has the same at api/v1/operations/ID for tokens)."""

    @web.authenticated
    async def get(self, op_id: str):
        try:
            op = self.portal.operation(self.user, op_id)
        except PortalError as e:
            raise web.HTTPError(e.status, str(e)) from None
        await self.portal.operations.wait(op, 20)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(op_view(op)))


class SSHConfigPage(PageHandler):
    @web.authenticated
    async def get(self):
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Content-Disposition", 'attachment; filename="lxcgpu-ssh-config"')
        self.finish(await self.portal.ssh_config(self.user))


class AdminPage(PageHandler):
    """Every user, every container, the audit log (hub admins)."""

    def check_admin(self) -> None:
        if not self.is_admin:
            raise web.HTTPError(403, "this page is for the lab's administrators")

    @web.authenticated
    async def get(self):
        self.check_admin()
        audit_user = self.get_query_argument("user", "").strip() or None
        audit_q = self.get_query_argument("q", "").strip() or None
        users = await self.portal.admin_users()
        containers = await self.portal.admin_containers()
        containers_of: dict[str, list] = {}
        for c in containers:
            if c.get("owner"):
                containers_of.setdefault(c["owner"], []).append(c)
        try:
            audit = await self.portal.admin_audit(user=audit_user, search=audit_q, limit=200)
        except PortalError as e:
            raise web.HTTPError(e.status, str(e)) from None
        self.render_page("admin.html", page="admin", users=users, containers=containers,
                         containers_of=containers_of, audit=audit, audit_user=audit_user,
                         audit_q=audit_q)


class AdminActionPage(AdminPage):
    @web.authenticated
    async def post(self, action: str):
        self.check_admin()
        who = {"actor": self.user, "source": self.request.remote_ip}
        user = self.get_body_argument("user", "").strip() or None
        if action == "push-keys":
            await self.act(self.portal.push_keys(user, **who),
                           lambda r: f"keys and port maps pushed again for {len(r['users'])} "
                                     "user(s)", to="admin")
            return
        if not user:
            self.done("which user?", ok=False, to="admin")
            return
        if not self.confirmed():
            self.done(f"tick the box to confirm: {action.replace('-', ' ')} {user}", ok=False,
                      to="admin")
            return
        if action == "stop":
            server = self.get_body_argument("server", "")
            await self.act(self.portal.set_state(user, server, "stop", **who),
                           f"{user}'s container on {server} stopped", to="admin")
        elif action == "remove-user":
            choice = self.get_body_argument("containers", "")
            if choice not in ("keep", "delete"):
                self.done("choose whether their containers are kept or deleted", ok=False,
                          to="admin")
                return
            await self.act(self.portal.remove_user(user, delete_containers=choice == "delete",
                                                   **who),
                           lambda r: f"{user} removed: {r['keys_removed']} keys and "
                                     f"{r['forwards_removed']} forwards gone; containers: "
                                     + ", ".join(f"{c['server']} {c['status']}"
                                                 for c in r["containers"]), to="admin")
        else:
            raise web.HTTPError(404)
