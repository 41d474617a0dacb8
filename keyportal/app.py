"""keyportal: the JupyterHub service (tornado, HubOAuth) at /services/keyportal/.

The REST API v1 lives under ``api/v1/``; the hub starts the service (see
``hub_config/jupyterhub_config.py``) with its own environment
(``JUPYTERHUB_SERVICE_URL``, ``JUPYTERHUB_API_TOKEN``, ...).

Who may do what:

- a JupyterHub token in the ``Authorization`` header (``token ...`` or
  ``Bearer ...``), or the browser session the hub's OAuth gave; a token in
  the URL is refused, whatever it is;
- the token must allow the service (``access:services!service=keyportal``)
  and carry ``custom:keyportal:use`` for the user it acts on (every user's
  role grants it for themselves: ``custom:keyportal:use!user``);
- a request made with the browser session (no token) that changes anything
  needs JupyterHub's XSRF token; token requests do not.

Every refusal is JSON ``{"status": N, "message": "..."}`` with a sentence a
researcher can act on; the service's log has the detail.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from jupyterhub.services.auth import HubOAuth, HubOAuthCallbackHandler, HubOAuthenticated
from tornado import httpserver, ioloop, web

from lxcspawner.lxd import LXDError
from lxcspawner.pool import PoolKeeper
from lxcspawner.settings import Settings
from lxcspawner.store import StoreError

from . import openapi, pages
from .operations import MAX_WAIT
from .portal import MAX_BODY, Portal, PortalError, _refusal

log = logging.getLogger("keyportal")

SERVICE = "keyportal"
USE_SCOPE = "custom:keyportal:use"
ADMIN_SCOPE = "custom:keyportal:admin"


class APIHandler(HubOAuthenticated, web.RequestHandler):
    """The API's base: authentication, scopes, JSON in and out."""

    @property
    def portal(self) -> Portal:
        return self.settings["portal"]

    async def prepare(self):
        if "token" in self.request.query_arguments:
            log.warning("refused a token in the URL of %s %s from %s", self.request.method,
                        self.request.path, self.request.remote_ip)
            raise PortalError("tokens in URLs are refused: send it in the Authorization "
                              "header (Authorization: token ...)", 400)
        if len(self.request.body or b"") > MAX_BODY:
            raise PortalError(f"the request is larger than {MAX_BODY // 1024} KiB", 413)
        # Off the event loop: the hub is asked (then cached a minute).
        model = await self.hub_auth.get_user(self, sync=False)
        if not model:
            if self.request.method not in ("GET", "HEAD") and self.request.cookies:
                raise PortalError("this change needs the page's XSRF token (or a JupyterHub "
                                  "token in the Authorization header)", 403)
            raise PortalError("log in to the hub first, or send a JupyterHub token in the "
                              "Authorization header", 401)
        if not self.hub_auth.check_scopes(self.hub_auth.access_scopes, model):
            raise PortalError("your token does not allow keyportal: make one on the hub's "
                              "token page with access to the keyportal service", 403)
        self.model = model
        self.caller = model["name"]
        # An administrator may act for a user: ?user=NAME (audited as the admin).
        on_behalf = self.get_query_argument("user", None)
        if on_behalf is not None and not self.request.path.startswith(self.api_admin):
            if not self.is_admin():
                raise PortalError("only administrators may act for another user (?user=)",
                                  403)
            if not on_behalf or len(on_behalf) > 255 or not on_behalf.isprintable():
                raise PortalError("user: a hub user name")
            await self.portal.existing_user(on_behalf)
            self.user = on_behalf
            return
        self.user = self.caller
        if not self.may_use(self.user):
            raise PortalError(f"your token lacks the scope {USE_SCOPE}: make one on the hub's "
                              "token page with it (or with your own permissions)", 403)

    @property
    def api_admin(self) -> str:
        return self.settings["prefix"] + "api/v1/admin/"

    def is_admin(self) -> bool:
        """custom:keyportal:admin, or a hub administrator's token (one that
        carries admin:users; the hub's own admin role cannot be given more
        scopes)."""
        scopes = set(self.model.get("scopes") or ())
        return ADMIN_SCOPE in scopes or "admin:users" in scopes

    def may_use(self, user: str) -> bool:
        scopes = set(self.model.get("scopes") or ())
        return USE_SCOPE in scopes or f"{USE_SCOPE}!user={user}" in scopes \
            or ADMIN_SCOPE in scopes

    @property
    def actor(self) -> str:
        return self.caller if self.model.get("kind", "user") == "user" \
            else f"service:{self.caller}"

    @property
    def source(self) -> str:
        return self.request.remote_ip or ""

    def body(self) -> dict:
        if not self.request.body:
            return {}
        try:
            data = json.loads(self.request.body)
        except (ValueError, UnicodeDecodeError):
            raise PortalError("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise PortalError("the request body must be a JSON object")
        return data

    def send(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data, indent=1, default=str))

    def write_error(self, status_code: int, **kwargs):
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, (LXDError, StoreError, ValueError)) and not isinstance(
                exc, PortalError):
            exc = _refusal(exc)
        if isinstance(exc, PortalError):
            status_code, message = exc.status, str(exc)
        elif isinstance(exc, web.HTTPError):
            message = exc.log_message or self._reason
            if status_code == 403 and "XSRF" in (exc.log_message or ""):
                message = ("this change needs the page's XSRF token (or a token in the "
                           "Authorization header)")
        else:
            message = "keyportal failed; the administrators have the details in its log"
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"status": status_code, "message": message}))

    def log_exception(self, typ, value, tb):
        if isinstance(value, PortalError):
            log.info("%s %s -> %d: %s", self.request.method, self.request.path, value.status,
                     value)
            self.set_status(value.status)
            return
        super().log_exception(typ, value, tb)


class MeHandler(APIHandler):
    async def get(self):
        self.send({**await self.portal.me(self.user), "kind": self.model.get("kind", "user")})


class ServersHandler(APIHandler):
    def get(self):
        self.send(self.portal.servers())


class KeysHandler(APIHandler):
    async def get(self):
        self.send(await self.portal.keys(self.user))

    async def post(self):
        if (self.request.headers.get("Content-Type") or "").startswith("text/plain"):
            try:
                text = self.request.body.decode("utf-8")
            except UnicodeDecodeError:
                raise PortalError("the key is not UTF-8 text") from None
        else:
            text = self.body().get("key")
            if not isinstance(text, str):
                raise PortalError('send {"key": "ssh-ed25519 AAAA... comment"}')
        self.send(await self.portal.add_keys(self.user, text, actor=self.actor,
                                             source=self.source), 201)


class KeyHandler(APIHandler):
    async def delete(self, fingerprint: str):
        self.send(await self.portal.remove_key(self.user, unquote(fingerprint),
                                               actor=self.actor, source=self.source))


class ContainersHandler(APIHandler):
    async def get(self):
        self.send(await self.portal.containers(self.user))


class ContainerHandler(APIHandler):
    async def post(self, server: str):
        self.send(await self.portal.create(self.user, server, actor=self.actor,
                                           source=self.source), 201)


class ContainerActionHandler(APIHandler):
    async def post(self, server: str, action: str):
        self.send(await self.portal.set_state(self.user, server, action, actor=self.actor,
                                              source=self.source))


class OperationStartHandler(APIHandler):
    """A long operation: 202 with the operation at once (``Location`` is
    where to poll it)."""

    def started(self, op: dict) -> None:
        where = f"{self.settings['prefix']}api/v1/operations/{op['id']}"
        self.set_header("Location", where)
        self.send(op, 202)


class RebuildHandler(OperationStartHandler):
    async def post(self, server: str):
        self.started(await self.portal.rebuild(self.user, server, actor=self.actor,
                                               source=self.source))


class ExportHandler(OperationStartHandler):
    async def post(self, server: str):
        self.started(await self.portal.export(self.user, server, actor=self.actor,
                                              source=self.source))


class OperationsHandler(APIHandler):
    def get(self):
        self.send([op.json() for op in self.portal.operations.of(self.user)])


class OperationHandler(APIHandler):
    async def get(self, op_id: str):
        op = self.portal.operation(self.user, op_id)
        wait = self.get_query_argument("wait", "0")
        try:
            seconds = float(wait)
        except ValueError:
            raise PortalError("wait: seconds, a number") from None
        if not 0 <= seconds <= MAX_WAIT:
            raise PortalError(f"wait: 0 to {MAX_WAIT} seconds")
        await self.portal.operations.wait(op, seconds)
        self.send(op.json())


class SnapshotsHandler(APIHandler):
    async def get(self, server: str):
        self.send(await self.portal.snapshots(self.user, server))

    async def post(self, server: str):
        name = self.body().get("name")
        if name is not None and not isinstance(name, str):
            raise PortalError("a snapshot's name is text")
        self.send(await self.portal.snapshot(self.user, server, name, actor=self.actor,
                                             source=self.source), 201)


class ScheduleHandler(APIHandler):
    async def get(self, server: str):
        self.send(await self.portal.snapshot_schedule(self.user, server))

    async def put(self, server: str):
        body = self.body()
        self.send(await self.portal.set_snapshot_schedule(
            self.user, server, body.get("schedule", ""), body.get("keep"), actor=self.actor,
            source=self.source))


class SnapshotHandler(APIHandler):
    async def delete(self, server: str, name: str):
        self.send(await self.portal.delete_snapshot(self.user, server, unquote(name),
                                                    actor=self.actor, source=self.source))


class RestoreHandler(APIHandler):
    async def post(self, server: str, name: str):
        self.send(await self.portal.restore(self.user, server, unquote(name), actor=self.actor,
                                            source=self.source))


class GPUsHandler(APIHandler):
    async def get(self, server: str):
        self.send(await self.portal.gpus(self.user, server))

    async def put(self, server: str):
        body = self.body()
        if "gpus" not in body:
            raise PortalError('send {"gpus": "all"} or {"gpus": ["GPU-...", 2]}')
        self.send(await self.portal.set_gpus(self.user, server, body["gpus"], actor=self.actor,
                                             source=self.source))


class ForwardsHandler(APIHandler):
    async def get(self, server: str):
        self.send(await self.portal.forwards(self.user, server))

    async def post(self, server: str):
        port = self.body().get("port")
        if port is None:
            raise PortalError('send {"port": N}: the port inside your container')
        self.send(await self.portal.add_forward(self.user, server, port, actor=self.actor,
                                                source=self.source), 201)


class ForwardHandler(APIHandler):
    async def delete(self, server: str, port: str):
        self.send(await self.portal.remove_forward(self.user, server, port, actor=self.actor,
                                                   source=self.source))


class SSHConfigHandler(APIHandler):
    async def get(self):
        identity = self.get_query_argument("identity", None)
        if identity is not None and (len(identity) > 200 or any(
                c in identity for c in "\n\r\0")):
            raise PortalError("identity: a path on your laptop, one line")
        text = await self.portal.ssh_config(self.user, identity)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Content-Disposition", 'attachment; filename="lxcgpu-ssh-config"')
        self.finish(text)




class IndexHandler(web.RequestHandler):
    """What is here, for anyone (no user data)."""

    def get(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({
            "service": SERVICE, "api": f"{self.settings['prefix']}api/v1/",
            "paths": openapi.listing(),
            "openapi": f"{self.settings['prefix']}api/v1/openapi.json",
            "auth": "a JupyterHub token in the Authorization header (token ...), "
                    f"with {USE_SCOPE}; see docs/user.md",
            "client": f"{self.settings['prefix']}lxcgpu"}, indent=1))


class AdminHandler(APIHandler):
    """Admin endpoints (see APIHandler.is_admin); a site may grant
    custom:keyportal:admin to a group through a role."""

    async def prepare(self):
        await super().prepare()
        if not self.is_admin():
            raise PortalError(f"this needs the scope {ADMIN_SCOPE} or a hub administrator's "
                              "token", 403)


class AdminUsersHandler(AdminHandler):
    async def get(self):
        self.send(await self.portal.admin_users())


class AdminContainersHandler(AdminHandler):
    async def get(self):
        self.send(await self.portal.admin_containers())


class AdminAuditHandler(AdminHandler):
    async def get(self):
        try:
            limit = int(self.get_query_argument("limit", "100"))
        except ValueError:
            raise PortalError("limit: a whole number") from None
        self.send(await self.portal.admin_audit(user=self.get_query_argument("user", None),
                                                search=self.get_query_argument("q", None),
                                                limit=limit))


class AdminUserHandler(AdminHandler):
    async def delete(self, name: str):
        choice = self.get_query_argument("containers", "")
        if choice not in ("keep", "delete"):
            raise PortalError("say what happens to their containers: ?containers=keep "
                              "(stopped, kept) or ?containers=delete (with their homes)")
        self.send(await self.portal.remove_user(unquote(name),
                                                delete_containers=choice == "delete",
                                                actor=self.actor, source=self.source))


class AdminPushKeysHandler(AdminHandler):
    async def post(self):
        user = self.body().get("user")
        if user is not None and not isinstance(user, str):
            raise PortalError('send {"user": NAME}, or nothing for every user')
        self.send(await self.portal.push_keys(user, actor=self.actor, source=self.source))


class OpenAPIHandler(web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(openapi.document(self.settings["prefix"]), indent=1))


class CLIHandler(web.RequestHandler):
    """The ``lxcgpu`` client itself (one file, standard library only), for
    anyone: ``curl -fsSLo ~/.local/bin/lxcgpu https://HUB/services/keyportal/lxcgpu``."""

    def get(self):
        self.set_header("Content-Type", "text/x-python; charset=utf-8")
        self.set_header("Content-Disposition", 'attachment; filename="lxcgpu"')
        self.finish(CLI_SOURCE.read_bytes())


CLI_SOURCE = Path(__file__).with_name("cli.py")


class NotFoundHandler(APIHandler):
    def prepare(self):
        raise PortalError("no such keyportal API path (see api/v1/ and docs/user.md)", 404)


SERVER = r"(?P<server>[a-z][a-z0-9-]{0,62})"


def api_routes() -> list[tuple[str, type]]:
    """The API's routes below ``api/v1/``, named groups as the handlers'
    arguments (and as keyportal.openapi's path parameters)."""
    c = f"containers/{SERVER}"
    return [
        ("me", MeHandler),
        ("servers", ServersHandler),
        ("keys", KeysHandler),
        (r"keys/(?P<fingerprint>.+)", KeyHandler),
        ("containers", ContainersHandler),
        (c, ContainerHandler),
        (f"{c}/(?P<action>start|stop)", ContainerActionHandler),
        (f"{c}/rebuild", RebuildHandler),
        (f"{c}/export", ExportHandler),
        (f"{c}/snapshots", SnapshotsHandler),
        (f"{c}/snapshot-schedule", ScheduleHandler),
        (f"{c}/snapshots/(?P<name>[^/]+)/restore", RestoreHandler),
        (f"{c}/snapshots/(?P<name>[^/]+)", SnapshotHandler),
        (f"{c}/gpus", GPUsHandler),
        (f"{c}/forwards", ForwardsHandler),
        (f"{c}/forwards/(?P<port>[^/]+)", ForwardHandler),
        ("ssh-config", SSHConfigHandler),
        ("operations", OperationsHandler),
        (r"operations/(?P<op_id>[A-Za-z0-9_-]{1,40})", OperationHandler),
        ("admin/users", AdminUsersHandler),
        (r"admin/users/(?P<name>[^/]+)", AdminUserHandler),
        ("admin/containers", AdminContainersHandler),
        ("admin/audit", AdminAuditHandler),
        ("admin/push-keys", AdminPushKeysHandler),
    ]


def make_app(portal: Portal, prefix: str, hub_auth: HubOAuth) -> web.Application:
    # A removed user's revoked tokens must not live on in this service's cache.
    portal.forget_tokens = hub_auth.cache.clear
    api = prefix + "api/v1/"
    routes = [(api + pattern, handler) for pattern, handler in api_routes()] + [
        (prefix, pages.HomeHandler),
        (prefix + "keys/add", pages.KeyAddPage),
        (prefix + "keys/remove", pages.KeyRemovePage),
        (prefix + f"containers/{SERVER}/(?P<action>start|stop|snapshot|schedule|restore"
                  "|delete-snapshot|rebuild|export|gpus|forward|unforward)", pages.ContainerPage),
        (prefix + "ssh-config", pages.SSHConfigPage),
        (prefix + r"operations/(?P<op_id>[A-Za-z0-9_-]{1,40})", pages.OperationPage),
        (prefix + "admin", pages.AdminPage),
        (prefix + "admin/(?P<action>stop|push-keys|remove-user)", pages.AdminActionPage),
        (prefix + "lxcgpu", CLIHandler),
        (api, IndexHandler),
        (api + "openapi.json", OpenAPIHandler),
        (prefix + "oauth_callback", HubOAuthCallbackHandler),
        (api + ".*", NotFoundHandler),
    ]
    # No tornado xsrf_cookies: HubOAuth accepts the browser session for a
    # change only with JupyterHub's XSRF token (requests with a token in
    # their header need none).
    hub_prefix = os.environ.get("JUPYTERHUB_BASE_URL", "/") + "hub/"
    return web.Application(routes, portal=portal, hub_auth=hub_auth, prefix=prefix,
                           hub_prefix=hub_prefix,
                           cookie_secret=os.urandom(32), default_handler_class=NotFoundHandler,
                           default_handler_args={})


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(levelname).1s %(asctime)s keyportal] "
                        "%(message)s")
    url = os.environ.get("JUPYTERHUB_SERVICE_URL")
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", f"/services/{SERVICE}/")
    if not url or not os.environ.get("JUPYTERHUB_API_TOKEN"):
        print("keyportal: run by the hub as a service (JUPYTERHUB_SERVICE_URL and "
              "JUPYTERHUB_API_TOKEN unset)", file=sys.stderr)
        return 2
    settings = Settings.load()
    portal = Portal(settings)
    # The handlers' hub_auth is HubOAuth's one instance (HubAuthenticated
    # takes hub_auth_class.instance()): configure that one, not a copy.
    hub_auth = HubOAuth.instance(cache_max_age=60, allow_token_in_url=False)
    app = make_app(portal, prefix, hub_auth)
    parts = urlsplit(url)
    # Bodies past MAX_BODY get a sentence (prepare); far larger ones are cut
    # off by tornado before they are buffered.
    server = httpserver.HTTPServer(app, xheaders=True, max_body_size=4 << 20)
    server.listen(parts.port or 80, parts.hostname or "127.0.0.1")
    log.info("keyportal on %s (prefix %s), GPU servers %s, store %s", url, prefix,
             ", ".join(settings.server_names), settings.store_url.split("@")[-1])
    # Each GPU server's prebuilt containers for new users (lxcspawner.pool).
    keeper = PoolKeeper(settings, portal.store)
    loop = ioloop.IOLoop.current()
    loop.add_callback(keeper.run)
    try:
        loop.start()
    except KeyboardInterrupt:
        log.info("keyportal stopped")
    finally:
        keeper.close()
        portal.close()
    return 0
