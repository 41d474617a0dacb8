"""lab-sync: a hub-managed service that ends the access of people who left.

Every ``interval`` seconds it asks the lab's directory, with the
authenticator's service account, about every hub user.  Someone whose entry
is gone, or who is in none of the allowed groups any more, is handled at
once, each step audited as ``lab-sync``:

- their Jupyter servers are stopped (their containers keep running: jobs and
  data are theirs until an admin decides);
- their API tokens are revoked;
- they are suspended in lxcgpu's store: their SSH keys stay in the store but
  are taken out of every container of theirs, and their SSH port maps and
  forwards are removed from the containers' config, so the node agent unmaps
  them.  Their containers do not start while suspended.

Someone who is back in the groups is resumed: their keys and port maps return
at their next start (or ``lxcgpu-admin container sync``).  A directory that
cannot be reached changes nothing in that round.

The hub starts it (see ``jupyterhub_config.py``) with the authenticator's
settings in ``$LXCGPU_LABSYNC`` (JSON, the service account's password among
them: the environment of a root process, never a command line) and a role
with the scopes below only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from urllib.parse import quote

import requests
from ldap3.core.exceptions import LDAPException
from traitlets import Int, TraitError, validate
from traitlets.config import Configurable

SERVICE = "lab-sync"
ENV_VAR = "LXCGPU_LABSYNC"
SCOPES = ["list:users", "read:users", "read:servers", "delete:servers", "read:tokens", "tokens"]
ACTOR = "lab-sync"

log = logging.getLogger("lxcgpu.labsync")


class LXCGPULabSync(Configurable):
    """Settings of the lab sync, from the site file (``c.LXCGPULabSync.*``)."""

    interval = Int(
        300, config=True,
        help="Seconds between two checks of every hub user against the directory; "
             "0 turns the sync off.  It runs only where the authenticator has a service "
             "account (LDAPAuthenticator.lookup_dn_search_user).")

    @validate("interval")
    def _non_negative(self, proposal):
        if proposal.value < 0:
            raise TraitError("LXCGPULabSync.interval must be >= 0")
        return proposal.value

    def service(self, ldap: dict) -> dict:
        """The entry for ``JupyterHub.services``."""
        env = {ENV_VAR: json.dumps({"interval": self.interval, "ldap": ldap})}
        return {"name": SERVICE, "command": [sys.executable, "-m", "hub_config.labsync"],
                "environment": env}

    def role(self) -> dict:
        return {"name": SERVICE, "scopes": list(SCOPES), "services": [SERVICE]}


class Hub:
    """The few hub API calls the sync needs, with the service's token."""

    def __init__(self, url: str, token: str):
        self.url = url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"token {token}"

    def _call(self, method: str, path: str, **kw):
        r = self.session.request(method, self.url + path, timeout=30, **kw)
        if r.status_code >= 400 and r.status_code != 404:
            raise RuntimeError(f"{method} {path}: {r.status_code} {r.text[:200]}")
        return r

    def users(self) -> list[dict]:
        out, offset = [], 0
        while True:
            page = self._call("get", "/users", params={"offset": offset, "limit": 200}).json()
            items = page["items"] if isinstance(page, dict) else page
            out.extend(items)
            if isinstance(page, list) or len(items) < 200:
                return out
            offset += len(items)

    def user(self, name: str) -> dict | None:
        """The hub's model of ``name`` (with its servers), or None."""
        r = self._call("get", f"/users/{quote(name)}")
        return None if r.status_code == 404 else r.json()

    def stop_servers(self, user: dict) -> list[str]:
        name = quote(user["name"])
        stopped = []
        for server in (user.get("servers") or {}):
            path = f"/users/{name}/servers/{quote(server)}" if server else f"/users/{name}/server"
            self._call("delete", path)
            stopped.append(server or "(default)")
        return stopped

    def revoke_tokens(self, name: str) -> int:
        q = quote(name)
        tokens = self._call("get", f"/users/{q}/tokens").json()
        tokens = tokens.get("api_tokens", []) + tokens.get("oauth_tokens", []) \
            if isinstance(tokens, dict) else tokens
        for t in tokens:
            self._call("delete", f"/users/{q}/tokens/{quote(t['id'])}")
        return len(tokens)


class LabSync:
    """One round: every hub user against the directory (see the module docstring)."""

    def __init__(self, auth, hub: Hub, settings):
        from lxcspawner.fleet import Fleet

        self.auth = auth
        self.hub = hub
        self.settings = settings
        self.store = settings.open_store()
        self.fleet = Fleet(settings, self.store, actor=ACTOR)
        self.keep = set(auth.allowed_users or ()) | set(auth.admin_users or ())

    async def round(self) -> dict[str, str]:
        """What happened to whom: ``{user: "suspended" | "resumed"}``."""
        users = await asyncio.to_thread(self.hub.users)
        changed = {}
        for user in users:
            name = user["name"]
            if user.get("kind", "user") != "user" or name in self.keep:
                continue
            try:
                groups = await asyncio.to_thread(self.auth.membership, name)
            except LDAPException as e:
                log.warning("the directory cannot be asked (%s); nothing changes this round", e)
                return changed
            left = groups is None or (bool(self.auth.allowed_groups) and not groups)
            if left:
                why = ("no longer in the directory" if groups is None
                       else "in none of the allowed groups")
                if await self.end_access(user, why):
                    changed[name] = "suspended"
            elif await asyncio.to_thread(self.store.get_user, name) is not None:
                if await asyncio.to_thread(self.store.set_suspended, name, False, actor=ACTOR):
                    changed[name] = "resumed"
        return changed

    async def end_access(self, user: dict, why: str) -> bool:
        name = user["name"]
        stopped = await asyncio.to_thread(self.hub.stop_servers, user)
        revoked = await asyncio.to_thread(self.hub.revoke_tokens, name)
        known = await asyncio.to_thread(self.store.get_user, name) is not None
        suspended = known and await asyncio.to_thread(
            self.store.set_suspended, name, True, actor=ACTOR, reason=why)
        if stopped or revoked:
            await asyncio.to_thread(self.store.audit, ACTOR, "user.access-ended", name,
                                    {"reason": why, "servers": stopped, "tokens": revoked})
        if known:
            # Keys and port maps out of their containers on every GPU server;
            # a server that fails is tried again next round (still suspended).
            failed = [r for r in await self.fleet.sync_user(name) if not r.ok]
            if failed:
                log.warning("%s: removing keys and port maps failed on %s", name,
                            "; ".join(f"{r.server} ({r.detail})" for r in failed))
                suspended = True
        if stopped or revoked or suspended:
            log.warning("%s is %s: servers stopped %s, %d tokens revoked, keys and port maps "
                        "removed", name, why, stopped or "none", revoked)
        return bool(stopped or revoked or suspended)


async def run(sync: LabSync, interval: int) -> None:
    while True:
        try:
            changed = await sync.round()
            log.info("checked the hub's users against the directory%s",
                     f": {changed}" if changed else "")
        except Exception as e:  # noqa: BLE001 - the next round tries again
            log.error("lab sync round failed: %s", e)
        await asyncio.sleep(interval)


def main() -> int:
    logging.basicConfig(level=logging.INFO,
                        format="[%(levelname).1s %(asctime)s lab-sync] %(message)s")
    from hub_config.authenticator import LXCGPUAuthenticator
    from lxcspawner.settings import Settings

    conf = json.loads(os.environ[ENV_VAR])
    auth = LXCGPUAuthenticator(**conf["ldap"])
    hub = Hub(os.environ["JUPYTERHUB_API_URL"], os.environ["JUPYTERHUB_API_TOKEN"])
    sync = LabSync(auth, hub, Settings.load())
    asyncio.run(run(sync, int(conf["interval"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
