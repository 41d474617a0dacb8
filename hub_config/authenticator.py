"""``LXCGPUAuthenticator``: jupyterhub-ldapauthenticator 2.x with an admin group,
certificate checks on by default, and the directory kept off the hub's event loop.

ldapauthenticator 2.x has no admin-group setting, and its ``auth_state`` lists
only the matched entries of ``allowed_groups``.  So the DNs in ``admin_groups``
are added to ``allowed_groups`` (their members may log in, and their membership
is looked up at each login), and :meth:`LXCGPUAuthenticator.is_admin` turns that
membership into the user's admin flag: True for members, False for everyone
else, so leaving the group revokes admin rights at the next login.

Its ``authenticate`` is a coroutine that makes blocking ldap3 calls without ever
awaiting; a slow or unreachable directory would freeze the whole hub.  It runs
here in a small thread pool instead, with a deadline.

Leaving the lab: with a service account (``lookup_dn_search_user`` and
``lookup_dn_search_password``, ldapauthenticator's own settings for it),
:meth:`LXCGPUAuthenticator.refresh_user` checks again, every
``auth_refresh_age`` seconds of a user's activity, that the user still exists
and is still in ``allowed_groups``; someone who is not loses their session
and their API tokens at once (``auth_refresh_strict``), without logging in
again.  A directory that cannot be reached changes nothing.
"""

from __future__ import annotations

import asyncio
import ssl
from concurrent.futures import ThreadPoolExecutor

import ldap3
from ldap3.core.exceptions import LDAPCommunicationError, LDAPException, LDAPStartTLSError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from ldapauthenticator import LDAPAuthenticator
from ldapauthenticator.ldapauthenticator import TlsStrategy
from tornado import web
from traitlets import Float, Int, List, Unicode, default, observe, validate

# What the login page says when the directory cannot be reached (the log
# has the detail).  503: nothing is wrong with the user's password.
DIRECTORY_DOWN = ("The lab's directory (LDAP) cannot be reached right now, so logins are "
                  "not possible. Servers that are running keep running. Please try again in "
                  "a few minutes, and tell your administrator if it persists.")


class LXCGPUAuthenticator(LDAPAuthenticator):
    """LDAP / Active Directory login for lxcgpu (see docs/ldap.md)."""

    admin_groups = List(
        Unicode(),
        config=True,
        help="""Full DNs of the LDAP groups whose members are JupyterHub admins.

        They are added to `LDAPAuthenticator.allowed_groups`, so their members
        may also log in.  Membership is checked at every login and is
        authoritative: a user in none of these groups loses admin rights at
        their next login, including rights given in the admin panel (users in
        `Authenticator.admin_users` stay admins).  Empty (the default): the
        directory decides nothing about admins.

        Example: ["cn=gpu-admins,ou=groups,dc=example,dc=org"]
        """,
    )

    ldap_threads = Int(
        4,
        config=True,
        help="""Logins checked against the directory at the same time.

        Each runs in its own thread, off the hub's event loop; more logins wait.
        """,
    )

    ldap_timeout = Float(
        30.0,
        config=True,
        help="""Seconds a login may take against the directory (all binds and
        searches together) before it is refused.""",
    )

    @default("tls_kwargs")
    def _default_tls_kwargs(self):
        return {"validate": ssl.CERT_REQUIRED}

    @validate("tls_kwargs")
    def _validate_tls_kwargs(self, proposal):
        # ldap3 accepts any server certificate unless told otherwise: require a
        # valid one unless the site explicitly chose another `validate`.
        return {"validate": ssl.CERT_REQUIRED, **proposal.value}

    @observe("tls_strategy")
    def _warn_insecure(self, change):
        if change.new == TlsStrategy.insecure:
            self.log.warning(
                "LDAPAuthenticator.tls_strategy is 'insecure': passwords cross the "
                "network in clear text. Use 'before_bind' (StartTLS) or 'on_connect' (LDAPS)."
            )

    @observe("admin_groups", "allowed_groups")
    def _include_admin_groups(self, change):
        allowed = list(self.allowed_groups or [])
        missing = [g for g in self.admin_groups if g not in allowed]
        if missing:
            self.allowed_groups = allowed + missing

    _executor: ThreadPoolExecutor | None = None

    def _pool(self) -> ThreadPoolExecutor:
        """The directory's worker threads (made at first use)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.ldap_threads, thread_name_prefix="lxcgpu-ldap"
            )
        return self._executor

    async def authenticate(self, handler, data):
        """The parent's LDAP login, run to completion in a worker thread."""
        # The parent's coroutine never awaits, so a private event loop in the
        # worker runs it through; it needs nothing from the hub's loop.
        future = self._pool().submit(asyncio.run, super().authenticate(handler, data))
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.ldap_timeout)
        except asyncio.TimeoutError:
            self.log.error(
                "Login of %r refused: the directory did not answer within %s s "
                "(LXCGPUAuthenticator.ldap_timeout)",
                data.get("username"), self.ldap_timeout,
            )
        except (LDAPCommunicationError, LDAPStartTLSError) as e:
            self.log.error("Login of %r refused: the directory at %s cannot be reached: %s: %s",
                           data.get("username"), self.server_address, type(e).__name__, e)
        raise web.HTTPError(503, DIRECTORY_DOWN)

    def membership(self, username: str) -> list[str] | None:
        """The ``allowed_groups`` the user is in, looked up with the service
        account (blocking); None if the user's entry does not exist.  Raises
        LDAPException when the directory cannot be asked."""
        conn = self.get_connection(self.lookup_dn_search_user, self.lookup_dn_search_password)
        if not conn:
            raise LDAPCommunicationError("the service account could not bind "
                                         f"({self.lookup_dn_search_user})")
        try:
            userdn = None
            if self.lookup_dn:
                # Found by a search, as at login (Active Directory, mostly).
                userdn = self.resolve_username(username)[1] or None
            for template in [] if userdn else self.bind_dn_template or []:
                dn = template.format(username=escape_rdn(username))
                if conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=[]):
                    userdn = dn
                    break
            if userdn is None:
                return None
            groups = []
            for group in self.allowed_groups or []:
                if conn.search(group, self.group_search_filter.format(
                        userdn=escape_filter_chars(userdn),
                        uid=escape_filter_chars(username)),
                        search_scope=ldap3.BASE, attributes=[]):
                    groups.append(group)
            return groups
        finally:
            conn.unbind()

    async def refresh_user(self, user, handler=None):
        """Still in the lab?  True (nothing to change), the refreshed admin
        flag, or False: the user left (no entry, or in none of
        ``allowed_groups``) and loses their session and tokens now."""
        if not self.lookup_dn_search_user or not (self.bind_dn_template or self.lookup_dn):
            return True
        if user.name in (self.allowed_users or set()) or user.name in (self.admin_users or set()):
            return True
        loop = asyncio.get_running_loop()
        try:
            groups = await asyncio.wait_for(
                loop.run_in_executor(self._pool(), self.membership, user.name),
                self.ldap_timeout)
        except (asyncio.TimeoutError, LDAPException) as e:
            self.log.warning("Cannot refresh %s against the directory (%s); keeping their "
                             "access until it answers", user.name, e)
            return True
        if groups is None or (self.allowed_groups and not groups):
            self.log.warning("%s is %s: their session and API tokens end now", user.name,
                             "no longer in the directory" if groups is None
                             else "in none of the allowed groups any more")
            return False
        if not self.admin_groups:
            return True
        return {"name": user.name, "admin": any(g in groups for g in self.admin_groups)}

    def is_admin(self, handler, authentication):
        """True for members of `admin_groups` (and `admin_users`); False for
        everyone else when `admin_groups` is set; else None (unchanged)."""
        admin = super().is_admin(handler, authentication)
        if admin or not self.admin_groups:
            return admin
        groups = (authentication.get("auth_state") or {}).get("ldap_groups") or []
        return any(group in groups for group in self.admin_groups)
