"""Async access to one LXD server, over pylxd, off the event loop.

Every call runs on one bounded thread pool, has a timeout, and is retried
with exponential backoff when the daemon is unreachable or busy.  Creating
what exists and deleting what is gone are successes.

Commands inside instances run with ``record-output`` and no websockets: it
works the same over the unix socket and over HTTPS (where pylxd's websocket
``execute()`` races on close), never hangs on a backgrounded child, and
passes argv as a list: no shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar
from urllib.parse import quote

import pylxd
import requests
import urllib3
from pylxd import exceptions as pylxd_exc

from . import naming, network
from .gpus import GPU, parse_resources

log = logging.getLogger("lxcspawner.lxd")

T = TypeVar("T")

DEFAULT_SOCKET_PATHS = ("/var/lib/lxd/unix.socket", "/var/snap/lxd/common/lxd/unix.socket")


def local_socket() -> str:
    """This machine's LXD socket: ``$LXD_DIR/unix.socket`` where LXD_DIR is
    set (as the lxc and lxd commands read it), else the deb's or the snap's."""
    if os.environ.get("LXD_DIR"):
        return os.path.join(os.environ["LXD_DIR"], "unix.socket")
    return next((p for p in DEFAULT_SOCKET_PATHS if os.path.exists(p)), DEFAULT_SOCKET_PATHS[0])



def _merged(current: Mapping, changes: Mapping | None) -> dict:
    """``current`` with ``changes`` applied: a value set, None removes the key."""
    out = dict(current)
    for k, v in (changes or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = dict(v) if isinstance(v, Mapping) else v
    return out

class LXDError(RuntimeError):
    """An LXD request failed; ``status`` is LXD's HTTP status when known."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LXDUnavailable(LXDError):
    """The LXD daemon cannot be reached."""


class LXDNotFound(LXDError):
    """The thing asked for does not exist."""


class LXDTimeout(LXDError):
    """A call or an operation took longer than allowed."""


class ImageNotFound(LXDNotFound):
    """The template image is missing."""


class LXDTooLarge(LXDError):
    """Output or a file from inside an instance is over the size allowed."""


# How long a GPU server's GPU count is taken as known (seconds).
GPU_COUNT_TTL_S = 60

# What lxcgpu reads back from inside an instance (a command's output, a file)
# at most: the container's root decides its size, so it is bounded.
MAX_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    """A path inside an instance as LXD's file API reports it, without
    following a link at its last component (intermediate links are followed)."""

    type: str          # "file", "directory" or "symlink"
    mode: int
    uid: int
    gid: int
    data: bytes        # a file's contents; a link's target; b"" for a directory


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str

    def check(self, argv: Sequence[str]) -> "ExecResult":
        if self.returncode != 0:
            raise LXDError(f"{argv[0]} exited {self.returncode}: "
                           f"{(self.stderr or self.stdout).strip()[:500]}")
        return self


@dataclass(frozen=True)
class InstanceState:
    """What lxcgpu needs of an instance's state."""

    name: str
    status: str  # "running", "stopped", "missing", or LXD's other states lower-cased
    addresses: tuple[str, ...] = ()
    memory_bytes: int | None = None
    pid: int | None = None      # of its init, on the host

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def ipv4(self) -> str | None:
        return next((a for a in self.addresses if ":" not in a), None)


def instance_status(instance: Mapping | None) -> str:
    """An instance's status from LXD's plain record, lower-cased ("running",
    "stopped", ...; "missing" for None): what its state would say, without
    LXD computing the rest of a state (disk, network, processes)."""
    return "missing" if instance is None else str(instance.get("status", "")).lower()


def _status_of(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the daemon is restarting, overloaded or unreachable."""
    if isinstance(exc, (LXDUnavailable, requests.ConnectionError, requests.Timeout,
                        pylxd_exc.ClientConnectionFailed, ConnectionError)):
        return True
    if isinstance(exc, LXDError):
        return exc.status in (502, 503, 504)
    return _status_of(exc) in (502, 503, 504)


def parse_time(stamp: str) -> datetime.datetime:
    """LXD's RFC 3339 time (its nanoseconds cut to microseconds)."""
    m = re.fullmatch(r"([^.Z+]+T[\d:]+)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", stamp)
    if not m:
        raise ValueError(f"not an RFC 3339 time: {stamp!r}")
    zone = m[3] if m[3] and m[3] != "Z" else "+00:00"
    return datetime.datetime.fromisoformat(f"{m[1]}.{((m[2] or '') + '000000')[:6]}{zone}")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the LXD daemon itself failed (gone, restarting,
    overloaded, its database closed), not that the request was wrong."""
    if _is_transient(exc) or isinstance(exc, LXDTimeout):
        return True
    return isinstance(exc, LXDError) and not isinstance(exc, LXDNotFound) and exc.status == 500


class LXD:
    """One LXD server (unix socket or HTTPS), used from asyncio.

    :param endpoint: a unix socket path or ``https://host:8443``; ``None``
        finds the local socket.
    :param cert: ``(cert_file, key_file)`` for HTTPS.
    :param verify: the server certificate (file path) to pin for HTTPS.
        The process environment's CA bundle variables never override it.
    """

    def __init__(self, endpoint: str | None = None, *, cert: tuple[str, str] | None = None,
                 verify: str | bool = True, project: str | None = None,
                 max_workers: int = 8, timeout: float = 60.0, retries: int = 4,
                 executor: ThreadPoolExecutor | None = None):
        self.endpoint = endpoint or local_socket()
        self.cert = cert
        self.verify = verify
        self.project = project
        self.timeout = timeout
        self.retries = retries
        self._executor = executor or ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="lxcgpu-lxd")
        self._client: pylxd.Client | None = None
        self._gpus: tuple[tuple[int, list[GPU]], float] | None = None   # (gpus(), when)
        self._gpu_locks: dict[int, asyncio.Lock] = {}    # per event loop

    # ------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return f"<LXD {self.endpoint}>"

    def _hint(self) -> str:
        if self.endpoint.startswith("/"):
            return (f"LXD is not reachable at {self.endpoint}: start it with "
                    "`setup/quickstart` (or `lxd --group root &` where systemd is absent, "
                    "`systemctl start lxd` / `snap start lxd` elsewhere)")
        return (f"LXD is not reachable at {self.endpoint}: check that the GPU server is up, "
                "that `core.https_address` is set there and that this host's certificate "
                "is trusted (docs/admin.md)")

    def _connect(self) -> pylxd.Client:
        if self._client is None:
            session = None
            if self.endpoint.startswith("https://"):
                # requests honours REQUESTS_CA_BUNDLE over an explicit verify;
                # pin the server certificate on a session that ignores it.
                session = requests.Session()
                session.trust_env = False
                session.verify = self.verify
                session.cert = self.cert
                if isinstance(self.verify, str):
                    # Pinned: the server must present exactly this certificate
                    # (its SHA-256 fingerprint; pylxd's adapter), whatever
                    # name or address the site reaches it by.
                    _check_pinned(self.verify, self.endpoint)
                    session.mount(self.endpoint, pylxd.client.LXDSSLAdapter())
            endpoint = self.endpoint
            if endpoint.startswith("/"):
                # pylxd turns a socket path into a URL only if it exists;
                # do it always, so a missing socket reads as "not running".
                endpoint = f"http+unix://{quote(endpoint, safe='')}"
                session = requests.Session()
                session.mount("http+unix://", _UnixAdapter(self._executor._max_workers + 2))
            try:
                self._client = pylxd.Client(endpoint=endpoint, cert=self.cert,
                                            verify=self.verify, timeout=self.timeout,
                                            project=self.project, session=session)
            except (pylxd_exc.ClientConnectionFailed, requests.ConnectionError,
                    FileNotFoundError, ConnectionError) as e:
                raise LXDUnavailable(f"{self._hint()} ({e})") from e
        return self._client

    def _api(self, path: str, *, any_project: bool = False):
        """The pylxd API node for an absolute ``/1.0/...`` path.
        ``any_project``: without this client's project (LXD refuses one
        beside ``all-projects``)."""
        node = self._connect().api
        if any_project and getattr(node, "_project", None) is not None:
            node = type(node)(node._api_endpoint, session=node.session,
                              timeout=node._timeout, project=None)
        for seg in path.split("?")[0].strip("/").split("/")[1:]:
            node = node[seg]
        return node

    def _translate(self, exc: Exception, what: str) -> LXDError:
        if isinstance(exc, LXDError):
            return exc
        status = _status_of(exc)
        msg = f"{what}: {exc}"
        if isinstance(exc, pylxd_exc.NotFound) or status == 404:
            return LXDNotFound(msg, 404)
        if isinstance(exc, (requests.ConnectionError, pylxd_exc.ClientConnectionFailed,
                            ConnectionError)):
            self._client = None
            return LXDUnavailable(f"{self._hint()} ({exc})")
        if isinstance(exc, requests.Timeout):
            return LXDTimeout(msg)
        return LXDError(msg, status)

    async def run(self, fn: Callable[..., T], *args, what: str = "LXD call",
                  timeout: float | None = None, retry: bool = True, **kwargs) -> T:
        """Run blocking ``fn(*args, **kwargs)`` on the executor, with a
        timeout and retries with backoff for transient failures."""
        loop = asyncio.get_running_loop()
        timeout = timeout or self.timeout
        attempts = self.retries + 1 if retry else 1
        delay = 0.2
        for attempt in range(1, attempts + 1):
            fut = loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                err: LXDError = LXDTimeout(f"{what}: no answer in {timeout:.0f}s")
            except Exception as e:  # noqa: BLE001 - translated and re-raised below
                err = self._translate(e, what)
                if err is not e:
                    err.__cause__ = e
            if attempt == attempts or not _is_transient(err):
                raise err
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, err, attempt,
                        attempts - 1, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0) * (0.8 + 0.4 * random.random())
        raise AssertionError("unreachable")

    # Blocking helpers; they run on the executor.

    def _request(self, method: str, path: str, *, params=None, json=None,
                 data=None, headers=None, timeout=None, ok=(200, 201, 202), raw=False,
                 stream=False):
        node = self._api(path, any_project=bool(params and params.get("all-projects")))
        # raw: the body is file content, not an LXD JSON envelope.
        kwargs: dict[str, Any] = {"is_api": False} if raw else {}
        if stream:
            kwargs["stream"] = True
        if params:
            kwargs["params"] = params
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        if headers:
            kwargs["headers"] = headers
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            resp = getattr(node, method)(**kwargs)
        except pylxd_exc.LXDAPIException as e:
            status = _status_of(e)
            if status == 404:
                raise LXDNotFound(f"{method.upper()} {path}: {e}", 404) from e
            raise LXDError(f"{method.upper()} {path}: {e}", status) from e
        if resp.status_code not in ok:
            raise LXDError(f"{method.upper()} {path}: HTTP {resp.status_code}",
                           resp.status_code)
        return resp

    def _wait_op(self, op_path: str, timeout: float) -> dict:
        """Wait for an LXD operation; raise if it failed."""
        op_id = op_path.rstrip("/").rsplit("/", 1)[-1]
        deadline = time.monotonic() + timeout
        while True:
            left = max(1, int(deadline - time.monotonic()))
            resp = self._request("get", f"/1.0/operations/{op_id}/wait",
                                 params={"timeout": min(left, 30)}, timeout=min(left, 30) + 10)
            md = resp.json().get("metadata") or {}
            if md.get("status") == "Success":
                return md
            if md.get("status") in ("Failure", "Cancelled"):
                raise LXDError(md.get("err") or f"operation {op_id} failed",
                               md.get("status_code"))
            if time.monotonic() >= deadline:
                self._cancel_op(op_id, md)
                raise LXDTimeout(f"operation {op_id} ({md.get('description') or 'LXD task'}) "
                                 f"still running after {timeout:.0f}s")

    def _cancel_op(self, op_id: str, md: Mapping) -> None:
        """Cancel an operation we gave up on, so it is not left running.  LXD
        cannot cancel some (exec: ``may_cancel`` false); execute() bounds
        those inside the instance instead."""
        if not md.get("may_cancel"):
            log.warning("operation %s (%s) timed out and LXD cannot cancel it", op_id,
                        md.get("description"))
            return
        try:
            self._request("delete", f"/1.0/operations/{op_id}")
            log.warning("operation %s (%s) timed out: cancelled", op_id, md.get("description"))
        except LXDError as e:
            log.warning("operation %s timed out; cancelling it failed: %s", op_id, e)

    def _read_capped(self, path: str, *, params=None, limit: int, what: str,
                     skip_directory: bool = False):
        """GET ``path`` (raw) reading at most ``limit`` bytes: (response, body).
        ``skip_directory``: a directory's listing is not read (body b"")."""
        resp = self._request("get", path, params=params, raw=True, stream=True)
        chunks, size = [], 0
        try:
            if skip_directory and resp.headers.get("X-LXD-type") == "directory":
                return resp, b""
            for chunk in resp.iter_content(65536):
                size += len(chunk)
                if size > limit:
                    raise LXDTooLarge(f"{what} is larger than {limit // 1024} KiB, the most "
                                      "lxcgpu reads from inside a container")
                chunks.append(chunk)
        finally:
            resp.close()
        return resp, b"".join(chunks)

    def _async_request(self, method: str, path: str, *, timeout: float, **kw) -> dict:
        resp = self._request(method, path, **kw)
        body = resp.json()
        if body.get("type") == "async":
            return self._wait_op(body["operation"], timeout)
        return body.get("metadata") or {}

    # ------------------------------------------------------------ server

    async def server_info(self) -> dict:
        return await self.run(lambda: self._request("get", "/1.0").json()["metadata"],
                              what="server info")

    async def resources(self) -> dict:
        return await self.run(lambda: self._request("get", "/1.0/resources").json()["metadata"],
                              what="server resources")

    async def set_server_config(self, changes: Mapping[str, str]) -> None:
        """Set server keys (``core.https_address``...), the others kept."""
        await self.run(lambda: self._request("patch", "/1.0", json={"config": dict(changes)}),
                       what="server config", retry=False)

    # Trust (lxcspawner.trust): the hub's client certificate on a GPU server.

    async def certificates(self) -> list[dict]:
        return await self.run(lambda: self._request(
            "get", "/1.0/certificates", params={"recursion": "1"}).json()["metadata"],
            what="trusted certificates")

    async def issue_trust_token(self, name: str) -> dict:
        """A pending certificate-add token for ``name``: the operation's
        metadata (fingerprint, addresses, secret).  It stays pending until
        used or cancelled, so it is not waited for."""
        def issue():
            body = self._request("post", "/1.0/certificates",
                                 json={"name": name, "type": "client", "token": True}).json()
            return (body.get("metadata") or {}).get("metadata") or {}
        md = await self.run(issue, what="trust token", retry=False)
        if not md.get("secret") or not md.get("fingerprint"):
            raise LXDError("LXD returned no token (it needs core.https_address set)")
        return md

    async def cancel_trust_tokens(self, name: str) -> int:
        """Cancel pending certificate-add tokens for ``name``; how many."""
        def cancel():
            ops = self._request("get", "/1.0/operations",
                                params={"recursion": "1"}).json()["metadata"] or {}
            done = 0
            for op in ops.get("running") or []:
                req = ((op.get("metadata") or {}).get("request") or {})
                if op.get("class") == "token" and req.get("name") == name:
                    self._request("delete", f"/1.0/operations/{op['id']}")
                    done += 1
            return done
        return await self.run(cancel, what="pending trust tokens", retry=False)

    async def add_trust(self, token: str, name: str) -> None:
        """Present a certificate-add token: this client's certificate becomes
        trusted (an untrusted client may do this one call)."""
        await self.run(lambda: self._request(
            "post", "/1.0/certificates",
            json={"type": "client", "name": name, "password": token}),
            what="adding the certificate", retry=False)

    async def gpu_count(self) -> int:
        """GPUs LXD sees on this server (0 where there are none); see gpus()."""
        return (await self.gpus())[0]

    async def gpus(self) -> tuple[int, list[GPU]]:
        """Every GPU LXD sees on this server, and its NVIDIA GPUs in
        nvidia-smi's order (lxcspawner.gpus).

        Read at most once a minute, by one caller at a time, and tried again
        once on an error: LXD's resources call walks sysfs, and a burst of
        them at once fails now and then (seen: "Failed to list
        /sys/bus/pci/devices: ... bad file descriptor")."""
        key = id(asyncio.get_running_loop())
        lock = self._gpu_locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._gpus
            if cached is not None and time.monotonic() - cached[1] < GPU_COUNT_TTL_S:
                return cached[0]
            try:
                res = await self.resources()
            except LXDUnavailable:
                raise
            except LXDError as e:
                log.warning("reading the GPUs of %s failed (%s); trying once more", self, e)
                await asyncio.sleep(0.5)
                res = await self.resources()
            found = (int((res.get("gpu") or {}).get("total") or 0), parse_resources(res))
            self._gpus = (found, time.monotonic())
            return found

    async def image_by_alias(self, alias: str) -> dict:
        """The image behind ``alias``; ImageNotFound names the command to run."""
        def get():
            try:
                target = self._request("get", f"/1.0/images/aliases/{alias}").json()
            except LXDNotFound:
                raise ImageNotFound(
                    f"template image {alias!r} not found in LXD at {self.endpoint}: "
                    "build it with `setup/build-image` (or `lxcgpu-image`)", 404) from None
            fp = target["metadata"]["target"]
            return self._request("get", f"/1.0/images/{fp}").json()["metadata"]
        return await self.run(get, what=f"image {alias}")

    # ------------------------------------------------------------ instances

    async def instance(self, name: str) -> dict | None:
        """The instance's record (config, devices, profiles, status), or None."""
        def get():
            try:
                return self._request("get", f"/1.0/instances/{name}").json()["metadata"]
            except LXDNotFound:
                return None
        return await self.run(get, what=f"get {name}")

    async def status(self, name: str) -> str:
        """The instance's status (see instance_status): from its record, not
        its state, which LXD computes at a cost."""
        return instance_status(await self.instance(name))

    async def list_instances(self, *, config_key: str | None = None,
                             all_projects: bool = False) -> list[dict]:
        """All instances (of every project, with ``all_projects``), their
        records with their status but not their state (recursion 1);
        optionally only those that set ``config_key``."""
        params = {"recursion": 1}
        if all_projects:
            params["all-projects"] = "true"

        def get():
            items = self._request("get", "/1.0/instances", params=params).json()["metadata"]
            if config_key:
                items = [i for i in items if config_key in (i.get("config") or {})]
            return items
        return await self.run(get, what="list instances")

    async def create_instance(self, name: str, *, image_alias: str | None,
                              config: Mapping[str, str] | None = None,
                              devices: Mapping[str, Mapping[str, str]] | None = None,
                              profiles: Sequence[str] = (), timeout: float = 300) -> dict:
        """Create a container from a local image (``None``: an empty one);
        an existing one is returned as is."""
        existing = await self.instance(name)
        if existing is not None:
            return existing
        if image_alias is not None:
            await self.image_by_alias(image_alias)
        body = {
            "name": name, "type": "container",
            "source": ({"type": "image", "alias": image_alias} if image_alias
                       else {"type": "none"}),
            "profiles": list(profiles), "config": dict(config or {}),
            "devices": {k: dict(v) for k, v in (devices or {}).items()},
        }

        def create():
            try:
                self._async_request("post", "/1.0/instances", json=body, timeout=timeout)
            except LXDError as e:
                # Lost a race with another creator: theirs is ours.
                if "already exists" not in str(e):
                    raise
        await self.run(create, what=f"create {name}", timeout=timeout + 30, retry=False)
        created = await self.instance(name)
        if created is None:
            raise LXDError(f"create {name}: LXD reported success but it is missing")
        return created

    async def update_config(self, name: str, changes: Mapping[str, str | None]) -> None:
        """Set (or, with None, remove) instance config keys in one PATCH-like PUT."""
        await self._update(name, config=changes, what=f"update {name}")

    async def update_devices(self, name: str,
                             changes: Mapping[str, Mapping[str, str] | None]) -> None:
        """Set (or, with None, remove) the instance's own devices in one PUT."""
        await self._update(name, devices=changes, what=f"update devices of {name}")

    async def update_instance(self, name: str, *,
                              config: Mapping[str, str | None] | None = None,
                              devices: Mapping[str, Mapping[str, str] | None] | None = None
                              ) -> None:
        """Config keys and devices set (None: removed) in one PUT."""
        await self._update(name, config=config, devices=devices, what=f"update {name}")

    async def _update(self, name: str, *, config: Mapping[str, str | None] | None = None,
                      devices: Mapping[str, Mapping[str, str] | None] | None = None,
                      what: str) -> None:
        def update():
            inst = self._request("get", f"/1.0/instances/{name}")
            etag = inst.headers.get("ETag")
            md = inst.json()["metadata"]
            cfg, devs = _merged(md["config"], config), _merged(md["devices"], devices)
            if cfg == md["config"] and devs == md["devices"]:
                return
            body = {"config": cfg, "devices": devs, "profiles": md["profiles"],
                    "description": md.get("description", ""),
                    "ephemeral": md.get("ephemeral", False)}
            self._async_request("put", f"/1.0/instances/{name}", json=body,
                                headers={"If-Match": etag} if etag else None,
                                timeout=self.timeout)
        await self.run(update, what=what)

    async def delete_instance(self, name: str, timeout: float = 120) -> None:
        """Stop (forcefully) and delete; already gone is success.  An
        instance busy with another operation (a start under way) is deleted
        once that one ends."""
        def delete():
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self._set_state(name, "stop", force=True, timeout=timeout)
                    self._async_request("delete", f"/1.0/instances/{name}", timeout=timeout)
                    return
                except LXDNotFound:
                    return
                except LXDError as e:
                    if "is busy running" not in str(e) or time.monotonic() > deadline:
                        raise
                    log.info("delete %s: %s; trying again", name, e)
                    time.sleep(0.5)
        await self.run(delete, what=f"delete {name}", timeout=timeout + 30)

    async def rename_instance(self, name: str, new_name: str, timeout: float = 120) -> None:
        """Rename a stopped instance (its snapshots and volatile keys go with it)."""
        if not naming.is_valid_lxd_name(new_name):
            raise ValueError(f"{new_name!r} is not an instance name")
        await self.run(lambda: self._async_request(
            "post", f"/1.0/instances/{name}", json={"name": new_name}, timeout=timeout),
            what=f"rename {name} to {new_name}", timeout=timeout + 30, retry=False)

    # Snapshots (names checked by the caller: naming.check_snapshot_name) of
    # an instance, or with ``pool`` of a custom volume in that storage pool.

    @staticmethod
    def _base(name: str, pool: str | None) -> str:
        return (f"/1.0/storage-pools/{pool}/volumes/custom/{name}" if pool
                else f"/1.0/instances/{name}")

    async def snapshots(self, name: str, *, pool: str | None = None) -> list[dict]:
        """The snapshots of the instance (of the custom volume ``name`` in
        ``pool``): name, created_at, size (-1: unknown), expires_at."""
        base = self._base(name, pool)

        def get():
            rows = self._request("get", f"{base}/snapshots",
                                 params={"recursion": "1"}).json()["metadata"] or []
            return [{"name": r.get("name", "").rsplit("/", 1)[-1],
                     "created_at": r.get("created_at"),
                     "size": r.get("size", -1), "expires_at": r.get("expires_at")}
                    for r in rows]
        return await self.run(get, what=f"snapshots of {name}")

    async def create_snapshot(self, name: str, snapshot: str, timeout: float = 300, *,
                              expires_at: str | None = None, pool: str | None = None) -> None:
        """``expires_at`` (RFC 3339): when LXD deletes it; None: the
        instance's (volume's) ``snapshots.expiry``, if it has one."""
        body = {"name": snapshot, **({"expires_at": expires_at} if expires_at else {})}
        base = self._base(name, pool)
        await self.run(lambda: self._async_request(
            "post", f"{base}/snapshots", json=body,
            timeout=timeout), what=f"snapshot {name}/{snapshot}", timeout=timeout + 30,
            retry=False)

    async def restore_snapshot(self, name: str, snapshot: str, timeout: float = 300, *,
                               pool: str | None = None) -> None:
        """Put the instance back to ``snapshot`` (LXD stops and restarts a
        running instance around it).  A custom volume (``pool``) can only be
        restored while no running instance uses it."""
        base = self._base(name, pool)
        await self.run(lambda: self._async_request(
            "put", base, json={"restore": snapshot}, timeout=timeout),
            what=f"restore {name}/{snapshot}", timeout=timeout + 30, retry=False)

    async def delete_snapshot(self, name: str, snapshot: str, timeout: float = 300, *,
                              pool: str | None = None) -> None:
        base = self._base(name, pool)
        await self.run(lambda: self._async_request(
            "delete", f"{base}/snapshots/{snapshot}", timeout=timeout),
            what=f"delete snapshot {name}/{snapshot}", timeout=timeout + 30, retry=False)

    async def export_backup(self, name: str, dest, *, timeout: float = 3600,
                            pool: str | None = None,
                            progress: Callable[[int], None] | None = None) -> int:
        """An LXD backup of the instance (of the custom volume ``name`` in
        ``pool``), snapshots included, written to ``dest`` (a path; written
        as ``dest.part`` and renamed, 0600); the backup is removed from LXD
        afterwards.  Its size in bytes.  ``progress(bytes)`` (called from a
        worker thread) follows the download: 0 while LXD makes the backup."""
        progress = progress or (lambda n: None)
        backup = f"lxcgpu-export-{int(time.time())}"
        base = self._base(name, pool)
        only = "volume_only" if pool else "instance_only"

        def export() -> int:
            progress(0)
            self._async_request("post", f"{base}/backups", timeout=timeout,
                                json={"name": backup, only: False,
                                      "optimized_storage": False,
                                      "compression_algorithm": "gzip"})
            part = f"{dest}.part"
            size = 0
            try:
                resp = self._request("get", f"{base}/backups/{backup}/export",
                                     raw=True, stream=True, timeout=timeout)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as f, contextlib.closing(resp):
                    for chunk in resp.iter_content(1 << 20):
                        f.write(chunk)
                        size += len(chunk)
                        progress(size)
                os.replace(part, dest)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(part)
                raise
            finally:
                with contextlib.suppress(LXDError):
                    self._async_request("delete", f"{base}/backups/{backup}", timeout=120)
            return size
        return await self.run(export, what=f"export {name}", timeout=timeout + 60, retry=False)

    # Custom storage volumes (a user's home on a GPU server).

    async def volume(self, pool: str, name: str) -> dict | None:
        """The custom volume's record (config, used_by), or None."""
        def get():
            try:
                return self._request(
                    "get", f"/1.0/storage-pools/{pool}/volumes/custom/{name}").json()["metadata"]
            except LXDNotFound:
                return None
        return await self.run(get, what=f"get volume {pool}/{name}")

    async def volumes(self, pool: str) -> list[dict]:
        """The custom volumes of this client's project in ``pool``."""
        def get():
            rows = self._request("get", f"/1.0/storage-pools/{pool}/volumes",
                                 params={"recursion": "1"}).json()["metadata"] or []
            return [r for r in rows if r.get("type") == "custom"]
        return await self.run(get, what=f"list volumes of {pool}")

    async def create_volume(self, pool: str, name: str, *,
                            config: Mapping[str, str] | None = None,
                            description: str = "", timeout: float = 300) -> None:
        """Create an empty filesystem volume; one that exists is left as is."""
        body = {"name": name, "type": "custom", "content_type": "filesystem",
                "config": dict(config or {}), "description": description}

        def create():
            try:
                self._async_request("post", f"/1.0/storage-pools/{pool}/volumes/custom",
                                    json=body, timeout=timeout)
            except LXDError as e:
                if "already exists" not in str(e):
                    raise
        await self.run(create, what=f"create volume {pool}/{name}", timeout=timeout + 30,
                       retry=False)

    async def update_volume_config(self, pool: str, name: str,
                                   changes: Mapping[str, str | None]) -> None:
        """Set (or, with None, remove) config keys of a custom volume."""
        path = f"/1.0/storage-pools/{pool}/volumes/custom/{name}"

        def update():
            resp = self._request("get", path)
            etag = resp.headers.get("ETag")
            md = resp.json()["metadata"]
            cfg = _merged(md.get("config") or {}, changes)
            if cfg == md.get("config"):
                return
            self._async_request("put", path, json={"config": cfg,
                                                   "description": md.get("description", "")},
                                headers={"If-Match": etag} if etag else None,
                                timeout=self.timeout)
        await self.run(update, what=f"update volume {pool}/{name}")

    async def delete_volume(self, pool: str, name: str, timeout: float = 300) -> None:
        """Delete a custom volume and its snapshots; already gone is success."""
        def delete():
            try:
                self._async_request("delete", f"/1.0/storage-pools/{pool}/volumes/custom/{name}",
                                    timeout=timeout)
            except LXDNotFound:
                pass
        await self.run(delete, what=f"delete volume {pool}/{name}", timeout=timeout + 30,
                       retry=False)

    def _set_state(self, name: str, action: str, *, force: bool, timeout: float) -> None:
        status = instance_status(self._request("get", f"/1.0/instances/{name}").json()["metadata"])
        if (action, status) in (("start", "running"), ("stop", "stopped")):
            return
        try:
            self._async_request("put", f"/1.0/instances/{name}/state",
                                json={"action": action, "timeout": int(timeout), "force": force},
                                timeout=timeout + 30)
        except LXDError as e:
            # Someone else changed the state meanwhile: fine if it is what we want.
            if "already running" in str(e) or "already stopped" in str(e) \
                    or "not running" in str(e):
                return
            raise

    async def start(self, name: str, timeout: float = 120) -> None:
        """Start the instance; already running is success."""
        await self.run(functools.partial(self._set_state, name, "start", force=False,
                                         timeout=timeout),
                       what=f"start {name}", timeout=timeout + 60)

    async def stop(self, name: str, *, force: bool = False, timeout: float = 60) -> None:
        """Stop cleanly (systemd shuts down); ``force`` kills at once.

        A clean stop that does not finish in ``timeout`` seconds is forced."""
        def stop():
            try:
                self._set_state(name, "stop", force=force, timeout=timeout)
            except LXDError as e:
                if force:
                    raise
                log.warning("clean stop of %s failed (%s); forcing", name, e)
                self._set_state(name, "stop", force=True, timeout=timeout)
        await self.run(stop, what=f"stop {name}", timeout=2 * timeout + 60)

    async def state(self, name: str) -> InstanceState:
        """Running / stopped / missing, the global addresses on eth0, memory."""
        def get():
            try:
                st = self._request("get", f"/1.0/instances/{name}/state").json()["metadata"]
            except LXDNotFound:
                return InstanceState(name, "missing")
            addrs = network.reported_addresses(st)
            mem = (st.get("memory") or {}).get("usage")
            return InstanceState(name, str(st.get("status", "")).lower(), addrs, mem,
                                 st.get("pid") or None)
        return await self.run(get, what=f"state of {name}")

    async def wait_for_address(self, name: str, timeout: float = 60, *,
                               expected: str | None = None) -> str:
        """Wait until the instance has a global IPv4 address (``expected``,
        if given) and return it: a readiness signal only, since the
        container says what its address is (network.assigned_ipv4 is the
        address to route to).

        DHCP leases raise no LXD event, so this follows the instance state,
        asking again after 50 ms, then less often (at most every 0.5 s)."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            st = await self.state(name)
            if st.status == "missing":
                raise LXDNotFound(f"instance {name} does not exist", 404)
            if st.ipv4 and (expected is None or expected in st.addresses):
                return expected or st.ipv4
            if st.status not in ("running", "starting"):
                raise LXDError(f"instance {name} is {st.status}, it will not get an address")
            if time.monotonic() > deadline:
                if expected and st.ipv4:
                    raise LXDTimeout(f"instance {name} did not take its address {expected} in "
                                     f"{timeout:.0f}s (it has {', '.join(st.addresses)})")
                raise LXDTimeout(f"instance {name} got no IPv4 address in {timeout:.0f}s "
                                 "(is DHCP on the bridge working? see `lxc info --show-log`)")
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def console_log(self, name: str) -> str:
        """LXD's log of the instance (for diagnostics)."""
        def get():
            try:
                return self._request("get", f"/1.0/instances/{name}/logs/lxc.log",
                                     raw=True).text
            except LXDError as e:
                return f"(no log: {e})"
        return await self.run(get, what=f"log of {name}", retry=False)

    # ------------------------------------------------------------ inside

    async def execute(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                      user: int = 0, group: int = 0, cwd: str | None = None,
                      timeout: float = 120) -> ExecResult:
        """Run ``argv`` in the instance and collect its output (at most
        MAX_READ_BYTES per stream, LXDTooLarge past it).

        ``env`` must be empty: LXD hands an exec's environment to a host
        process on its command line (``lxd forkexec ...``), where every host
        user can read it in the process list, so nothing may travel there
        (secrets go into a root-only file inside, see jupyter.py).  The
        command runs under ``timeout`` inside the instance, since LXD cannot
        cancel an exec operation: one that overruns ``timeout`` is killed
        (LXDTimeout).  It must finish by itself: start long-lived processes
        with ``systemd-run``."""
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a non-empty list of strings")
        if env:
            raise ValueError("lxd.execute takes no environment: LXD puts it on a host "
                             "command line that every host user can read; write a "
                             "root-only file inside the container instead")
        limit = max(1, int(timeout))
        body: dict[str, Any] = {
            "command": ["timeout", "--kill-after=5", "--", f"{limit}s", *argv],
            "environment": {},
            "wait-for-websocket": False, "record-output": True, "interactive": False,
            "user": user, "group": group,
        }
        if cwd:
            body["cwd"] = cwd

        def forget(paths):
            for path in paths:
                try:
                    self._request("delete", path)
                except LXDError:
                    pass

        def run_exec():
            md = self._async_request("post", f"/1.0/instances/{name}/exec", json=body,
                                     timeout=limit + 10)
            meta = md.get("metadata") or {}
            out, too_large = {}, None
            paths = list((meta.get("output") or {}).items())
            for fd, path in paths:
                try:
                    out[fd] = self._read_capped(
                        path, limit=MAX_READ_BYTES,
                        what=f"the output of {argv[0]} in {name}")[1].decode("utf-8", "replace")
                except LXDTooLarge as e:
                    too_large = e
            # LXD's copies of the output go after the caller has its result
            # (at once if the client is closing).
            try:
                self._executor.submit(forget, [path for _, path in paths])
            except RuntimeError:
                forget([path for _, path in paths])
            if too_large is not None:
                raise too_large
            rc = int(meta.get("return", -1))
            if rc == 124:
                raise LXDTimeout(f"{argv[0]} in {name} did not finish in {limit} s and "
                                 "was stopped")
            return ExecResult(rc, out.get("1", ""), out.get("2", ""))
        return await self.run(run_exec, what=f"exec {argv[0]} in {name}",
                              timeout=timeout + 30, retry=False)

    def _entry(self, name: str, path: str, limit: int = MAX_READ_BYTES) -> FileEntry | None:
        try:
            resp, body = self._read_capped(f"/1.0/instances/{name}/files",
                                           params={"path": path}, limit=limit,
                                           what=f"{path} in {name}", skip_directory=True)
        except LXDNotFound:
            return None
        h = resp.headers
        return FileEntry(h.get("X-LXD-type", "file"), int(h.get("X-LXD-mode") or "0", 8),
                         int(h.get("X-LXD-uid") or -1), int(h.get("X-LXD-gid") or -1), body)

    async def file_entry(self, name: str, path: str, *,
                         max_bytes: int = MAX_READ_BYTES) -> FileEntry | None:
        """What is at ``path`` (a link itself, not its target), or None."""
        return await self.run(functools.partial(self._entry, name, path, max_bytes),
                              what=f"read {path} in {name}")

    async def get_file(self, name: str, path: str, *,
                       max_bytes: int = MAX_READ_BYTES) -> bytes | None:
        """A file's contents (at most ``max_bytes``, LXDTooLarge past it), or
        None if it does not exist.  A link there is refused, not followed."""
        entry = await self.file_entry(name, path, max_bytes=max_bytes)
        if entry is None:
            return None
        if entry.type != "file":
            raise LXDError(f"{path} in {name} is a {entry.type}, not a file")
        return entry.data

    def _unlinked(self, name: str, path: str) -> str | None:
        """Make ``path`` safe to write through LXD's file API, which follows
        links: refuse a link at a parent directory, remove one at ``path``
        itself (the link, never its target).  Only the container's root can
        plant links in the directories lxcgpu writes to with this; a race with
        it gains it nothing it could not do itself.  The first part of the
        path that does not exist, if any."""
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:i])
            entry = self._entry(name, sub)
            if entry is None:
                return sub
            if entry.type != "symlink":
                continue
            if i < len(parts):
                raise LXDError(f"refusing to write {path} in container {name}: {sub} is a "
                               f"symbolic link (to {entry.data.decode('utf-8', 'replace')}), "
                               "which lxcgpu does not follow")
            log.warning("%s in %s is a link to %r: replacing the link", path, name,
                        entry.data.decode("utf-8", "replace"))
            self._request("delete", f"/1.0/instances/{name}/files", params={"path": path})
        return None

    async def put_file(self, name: str, path: str, data: bytes | str, *, mode: int = 0o644,
                       uid: int = 0, gid: int = 0, dir_mode: int | None = None) -> None:
        """Write a file through LXD's file API.  LXD resolves the path inside
        the container but follows links, so a link at a parent is refused
        and one at ``path`` is replaced (see _unlinked).  ``dir_mode``: make
        the file's directory (root's, with this mode) if it is missing, in
        the same walk."""
        if isinstance(data, str):
            data = data.encode()
        headers = {"X-LXD-type": "file", "X-LXD-mode": f"{mode:04o}", "X-LXD-uid": str(uid),
                   "X-LXD-gid": str(gid), "X-LXD-write": "overwrite",
                   "Content-Type": "application/octet-stream"}
        parent = path.rstrip("/").rsplit("/", 1)[0]

        def put():
            missing = self._unlinked(name, path)
            if dir_mode is not None and missing == parent:
                self._mkdir(name, parent, dir_mode, 0, 0)
            self._request("post", f"/1.0/instances/{name}/files", params={"path": path},
                          data=data, headers=headers)
        await self.run(put, what=f"write {path} in {name}")

    async def push_file(self, name: str, path: str, source, *, mode: int = 0o644,
                        timeout: float = 1800) -> None:
        """Write the local file ``source`` (a path) to ``path`` in the
        container, streamed (an installer of hundreds of MiB is never held in
        memory); root's, links handled as in put_file."""
        headers = {"X-LXD-type": "file", "X-LXD-mode": f"{mode:04o}", "X-LXD-uid": "0",
                   "X-LXD-gid": "0", "X-LXD-write": "overwrite",
                   "Content-Type": "application/octet-stream"}

        def push():
            self._unlinked(name, path)
            with open(source, "rb") as f:
                self._request("post", f"/1.0/instances/{name}/files", params={"path": path},
                              data=f, headers=headers, timeout=timeout)
        await self.run(push, what=f"write {path} in {name}", timeout=timeout + 30,
                       retry=False)

    async def make_dir(self, name: str, path: str, *, mode: int = 0o755, uid: int = 0,
                       gid: int = 0) -> None:
        """Create a directory (or set the owner and mode of an existing one);
        links are handled as in put_file."""
        def mkdir():
            self._unlinked(name, path)
            self._mkdir(name, path, mode, uid, gid)
        await self.run(mkdir, what=f"mkdir {path} in {name}")

    def _mkdir(self, name: str, path: str, mode: int, uid: int, gid: int) -> None:
        self._request("post", f"/1.0/instances/{name}/files", params={"path": path},
                      headers={"X-LXD-type": "directory", "X-LXD-mode": f"{mode:04o}",
                               "X-LXD-uid": str(uid), "X-LXD-gid": str(gid)})

    async def ensure_project(self, name: str, *, description: str = "",
                             config: Mapping[str, str] | None = None) -> None:
        """Create an LXD project if it is missing.  By default it shares the
        default project's images, profiles, volumes and networks."""
        body = {"name": name, "description": description,
                "config": {"features.images": "false", "features.profiles": "false",
                           "features.storage.volumes": "false", **(config or {})}}

        def create():
            try:
                self._request("get", f"/1.0/projects/{name}")
            except LXDNotFound:
                self._request("post", "/1.0/projects", json=body)
        await self.run(create, what=f"create project {name}")

    async def list_projects(self) -> list[dict]:
        return await self.run(lambda: self._request("get", "/1.0/projects", params={
            "recursion": 1}).json()["metadata"], what="list projects")

    async def delete_project(self, name: str) -> None:
        """Delete an (empty) project; one that is gone is success."""
        def delete():
            try:
                self._request("delete", f"/1.0/projects/{name}")
            except LXDNotFound:
                pass
        await self.run(delete, what=f"delete project {name}")

    async def profile(self, name: str) -> dict:
        """A profile's record (config, devices)."""
        def get():
            return self._request("get", f"/1.0/profiles/{name}").json()["metadata"]
        return await self.run(get, what=f"profile {name}")

    async def network(self, name: str) -> dict:
        """A network's record (type, managed, config such as ipv4.address)."""
        def get():
            return self._request("get", f"/1.0/networks/{name}").json()["metadata"]
        return await self.run(get, what=f"network {name}")

    async def bridges(self) -> list[dict]:
        """The records of the bridges LXD manages (where containers get
        their addresses), by name."""
        def get():
            nets = self._request("get", "/1.0/networks", params={"recursion": 1}).json()["metadata"]
            return sorted((n for n in nets if n.get("managed") and n.get("type") == "bridge"),
                          key=lambda n: n["name"])
        return await self.run(get, what="list networks")

    async def managed_bridges(self) -> list[str]:
        """The names of the bridges LXD manages."""
        return [n["name"] for n in await self.bridges()]

    def follow_events(self, on_event: Callable[[dict], None], *,
                      types: Sequence[str] = ("lifecycle",),
                      on_connect: Callable[[], None] | None = None) -> "EventStream":
        """Follow LXD's event stream in a thread of its own (see EventStream)."""
        return EventStream(self, on_event, types=types, on_connect=on_connect).start()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _check_pinned(path: str, endpoint: str) -> None:
    """A pinned certificate that cannot be read is the site's mistake: say so
    (before any connection), rather than fail each request obscurely."""
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise LXDError(f"the certificate pinned for {endpoint} ({path}) cannot be used: "
                       f"{getattr(e, 'strerror', None) or e}; copy the server's "
                       "/var/lib/lxd/server.crt there (docs/admin.md section 6)") from None


class _UnixPool(pylxd.client._UnixSocketHTTPConnectionPool):
    def __init__(self, socket_url: str, maxsize: int):
        urllib3.HTTPConnectionPool.__init__(self, "localhost", maxsize=maxsize)
        self.socket_path = socket_url


class _UnixAdapter(pylxd.client._UnixAdapter):
    """pylxd's unix-socket adapter keeps one connection; ours keeps one per
    worker thread, so concurrent calls reuse connections instead of opening
    and discarding new ones."""

    def __init__(self, maxsize: int):
        super().__init__()
        self._maxsize = maxsize

    def get_connection(self, url, proxies):
        with self.pools.lock:
            conn = self.pools.get(url)
            if conn is None:
                conn = self.pools[url] = _UnixPool(url, self._maxsize)
            return conn


class _EventSocket(pylxd.client._WebsocketClient):
    """pylxd's events websocket (it handles the unix socket and the Origin
    header LXD refuses), handing each message to a callback."""

    on_event: Callable[[dict], None]

    def received_message(self, message):
        try:
            event = json.loads(message.data.decode("utf-8"))
        except ValueError:
            log.warning("unreadable LXD event: %r", message.data[:200])
            return
        try:
            self.on_event(event)
        except Exception:  # noqa: BLE001 - a bad handler must not end the stream
            log.exception("handling LXD event %s failed", event.get("metadata", {}).get("action"))


class EventStream:
    """LXD's event stream, followed in a daemon thread.

    ``on_event(event)`` runs in that thread for every event (hand it over to
    an event loop with ``call_soon_threadsafe``).  When the stream breaks
    (LXD restarts) it reconnects with backoff and calls ``on_connect()``
    each time it is connected again: events may have been missed meanwhile,
    so that is the moment to resynchronise.
    """

    def __init__(self, lxd: "LXD", on_event: Callable[[dict], None], *,
                 types: Sequence[str] = ("lifecycle",),
                 on_connect: Callable[[], None] | None = None):
        self.lxd = lxd
        self.on_event = on_event
        self.types = {pylxd.client.EventType(t) for t in types}
        self.on_connect = on_connect
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._ws: _EventSocket | None = None
        self._thread = threading.Thread(target=self._run, name="lxd-events", daemon=True)

    def start(self) -> "EventStream":
        self._thread.start()
        return self

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                ws = self.lxd._connect().events(websocket_client=_EventSocket,
                                                event_types=self.types)
                if self.lxd.project:
                    # pylxd adds the project to requests, not to the websocket.
                    sep = "&" if "?" in ws.resource else "?"
                    ws.resource += f"{sep}project={quote(self.lxd.project, safe='')}"
                ws.on_event = self.on_event
                ws.connect()
                self._ws = ws
                self.connected.set()
                delay = 0.2
                log.info("following LXD events at %s", self.lxd.endpoint)
                if self.on_connect:
                    self.on_connect()
                ws.run()
            except Exception as e:  # noqa: BLE001 - any failure: reconnect
                if not self._stop.is_set():
                    log.warning("LXD event stream: %s", e)
            finally:
                self._ws = None
                self.connected.clear()
            if self._stop.wait(delay):
                break
            log.info("reconnecting to LXD events")
            delay = min(delay * 2, 10.0)

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close()
            with contextlib.suppress(Exception):
                ws.terminate()
        self._thread.join(timeout)
