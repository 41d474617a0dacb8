"""The node agent's load API: what the collector saw last, over HTTP.

- ``GET /api/v1/load``: the collector's latest document (JSON; see
  :mod:`monitor.collector`);
- ``GET /metrics``: the same as Prometheus text (labels node, gpu, uuid,
  user);
- ``GET /api/v1/health``: ``{"node": NAME, "ok": true}``, without a token
  (for a load balancer's or an admin's check; no details).

Process details are not public: the first two need the site's monitor token
(``[monitor] token_file``) in the ``Authorization`` header (``Bearer ...`` or
``token ...``); a token in the URL is refused.  A request never makes the
agent ask NVML, /proc or LXD anything: it is served from the last sample,
encoded once per sample, so its cost is bounded whatever the rate.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Callable

from tornado import httpclient, httpserver, netutil, web

log = logging.getLogger("lxcgpu.node")


class _Encoded:
    """The latest document, encoded once per sample: as JSON and for
    Prometheus."""

    def __init__(self, latest: Callable[[], dict | None], metrics: Callable[[dict], str]):
        self._latest, self._metrics = latest, metrics
        self._doc: dict | None = None
        self._bodies: dict[str, bytes] = {}

    def body(self, kind: str) -> bytes | None:
        """``kind`` "json" or "metrics"; None before the first sample."""
        doc = self._latest()
        if doc is not None and doc is not self._doc:
            self._doc = doc
            self._bodies = {"json": json.dumps(doc, separators=(",", ":")).encode(),
                            "metrics": self._metrics(doc).encode()}
        return self._bodies.get(kind) if self._doc is not None else None


class _Handler(web.RequestHandler):
    public = False

    def prepare(self):
        if "token" in self.request.query_arguments:
            self._refuse(400, "tokens in URLs are refused: send it in the Authorization header")
        if self.public:
            return
        given = (self.request.headers.get("Authorization") or "").split(None, 1)
        ok = (len(given) == 2 and given[0].lower() in ("bearer", "token")
              and hmac.compare_digest(given[1].strip().encode(),
                                      self.settings["token"].encode()))
        if not ok:
            log.info("load API: refused %s %s from %s (no or wrong token)", self.request.method,
                     self.request.path, self.request.remote_ip)
            self.set_header("WWW-Authenticate", 'Bearer realm="lxcgpu-node"')
            self._refuse(401, "the monitor token is needed (Authorization: Bearer ...)")

    def _refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"status": status, "message": message}))
        raise web.Finish()

    def write_error(self, status_code: int, **kwargs):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"status": status_code, "message": self._reason}))



class SampleHandler(_Handler):
    """The last sample, as ``kind`` ("json" or "metrics") says."""

    def initialize(self, kind: str, content_type: str) -> None:
        self.kind, self.content_type = kind, content_type

    def get(self):
        body = self.settings["encoded"].body(self.kind)
        if body is None:
            self._refuse(503, "no sample yet: the agent has just started")
        self.set_header("Content-Type", self.content_type)
        self.set_header("Cache-Control", "no-store")
        self.finish(body)


class HealthHandler(_Handler):
    public = True

    def get(self):
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"node": self.settings["node"], "ok": True}))


def quiet_access_log(logger: logging.Logger) -> Callable[[web.RequestHandler], None]:
    """A tornado ``log_function``: answers at debug level (pollers ask every
    few seconds), refusals at info, errors at error."""
    def log_request(handler: web.RequestHandler) -> None:
        status = handler.get_status()
        level = logging.DEBUG if status < 400 else logging.INFO if status < 500 \
            else logging.ERROR
        logger.log(level, "%d %s %s (%s) %.1f ms", status, handler.request.method,
                   handler.request.path, handler.request.remote_ip,
                   1000 * handler.request.request_time())
    return log_request


def make_app(node: str, token: str, latest: Callable[[], dict | None],
             metrics: Callable[[dict], str]) -> web.Application:
    if len(token) < 32:
        raise ValueError("the monitor token must have at least 32 characters")
    return web.Application([
        (r"/api/v1/load", SampleHandler,
         {"kind": "json", "content_type": "application/json; charset=utf-8"}),
        (r"/metrics", SampleHandler,
         {"kind": "metrics", "content_type": "text/plain; version=0.0.4; charset=utf-8"}),
        (r"/api/v1/health", HealthHandler),
    ], node=node, token=token, encoded=_Encoded(latest, metrics),
        log_function=quiet_access_log(log))


def serve(app: web.Application, host: str, port: int) -> tuple[httpserver.HTTPServer, int]:
    """Listen on ``host:port`` (port 0: one the kernel picks) in the running
    event loop; the server and its port."""
    server = httpserver.HTTPServer(app, max_body_size=4096, idle_connection_timeout=60)
    sockets = netutil.bind_sockets(port, host)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    log.info("load API on http://%s:%d (/api/v1/load, /metrics)", host, port)
    return server, port


# ---------------------------------------------------------------- the client

def unreachable(url: str, e: BaseException | None) -> str:
    """Why an agent gave no HTTP answer, as a sentence."""
    why = (getattr(e, "strerror", None) or str(e or "no answer")).lower()
    if isinstance(e, (TimeoutError, httpclient.HTTPClientError)) and "timeout" in why:
        why = "it did not answer in time"
    return f"its agent at {url} does not answer ({why})"


async def fetch_load(http: httpclient.AsyncHTTPClient, url: str, token: str, node: str, *,
                     timeout: float) -> dict:
    """The load document of ``node``'s agent at ``url`` (the dashboard's
    poller, the driver sync); RuntimeError (a sentence) when the agent
    refuses or is not ``node``'s, OSError or RuntimeError when none answers."""
    r = await http.fetch(f"{url}/api/v1/load", request_timeout=timeout,
                         connect_timeout=min(timeout, 3),
                         headers={"Authorization": f"Bearer {token}"},
                         follow_redirects=False, raise_error=False)
    if r.code == 599:           # no HTTP answer: refused, timed out, unreachable
        raise RuntimeError(unreachable(url, r.error))
    if r.code != 200:
        try:
            said = json.loads(r.body)["message"]
        except (ValueError, KeyError, TypeError):
            said = r.reason
        raise RuntimeError(f"its agent answered {r.code}: {said}")
    doc = json.loads(r.body)
    if not isinstance(doc, dict) or doc.get("node") != node:
        raise RuntimeError(f"the agent at {url} is not {node}'s "
                           f"(it says {doc.get('node') if isinstance(doc, dict) else '?'})")
    return doc
