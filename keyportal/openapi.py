"""keyportal's REST API v1 as OpenAPI 3.1, served at ``api/v1/openapi.json``.

The one description of the API: the index at ``api/v1/`` lists its paths,
and a test checks that every route the service answers is described here.
"""

from __future__ import annotations

from typing import Any

_ERR = {"description": "a refusal: {\"status\": N, \"message\": \"a sentence\"}",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JSON = {"description": "JSON", "content": {"application/json": {}}}
SERVER = {"name": "server", "in": "path", "required": True, "schema": {"type": "string"},
          "description": "a GPU server of the site (GET servers)"}
NAME = {"name": "name", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"},
        "description": "a snapshot's name"}
PORT = {"name": "port", "in": "path", "required": True,
        "schema": {"type": "integer", "minimum": 1, "maximum": 65535},
        "description": "the port inside the container"}
FINGERPRINT = {"name": "fingerprint", "in": "path", "required": True,
               "schema": {"type": "string"},
               "description": "SHA256:... as GET keys shows it, URL-encoded"}


def _op(summary: str, *, params=(), body: dict | None = None, ok: int = 200,
        admin: bool = False, text: bool = False) -> dict:
    on_behalf = [] if admin else [{
        "name": "user", "in": "query", "required": False, "schema": {"type": "string"},
        "description": "administrators only: act for this user"}]
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [*params, *on_behalf],
        "responses": {str(ok): {"description": "text", "content": {"text/plain": {}}}
                      if text else _JSON,
                      "400": _ERR, "401": _ERR, "403": _ERR, "404": _ERR, "409": _ERR,
                      "503": _ERR},
        "security": [{"token": [("custom:keyportal:admin" if admin
                                 else "custom:keyportal:use")]}],
    }
    if body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {
            "schema": {"type": "object", "properties": body}}}}
    return op


PATHS: dict[str, dict[str, dict]] = {
    "/me": {"get": _op("your login, SSH port and the GPU servers")},
    "/servers": {"get": _op("the site's GPU servers and their SSH addresses")},
    "/keys": {"get": _op("your SSH public keys"),
              "post": _op("add keys (one per line, all or none); pushed to every server",
                          body={"key": {"type": "string"}}, ok=201)},
    "/keys/{fingerprint}": {"delete": _op("remove a key everywhere", params=[FINGERPRINT])},
    "/containers": {"get": _op("your container on each GPU server: state, address, ssh")},
    "/containers/{server}": {"post": _op("make your container there (or make it ready)",
                                         params=[SERVER], ok=201)},
    "/containers/{server}/start": {"post": _op("start it", params=[SERVER])},
    "/containers/{server}/stop": {"post": _op("stop it", params=[SERVER])},
    "/containers/{server}/rebuild": {"post": _op(
        "start a rebuild (202, an operation to poll): a new system from the current "
        "template; your home (/home/<login>), address, SSH port, forwards, keys and snapshot "
        "schedule stay; the old system's snapshots go", params=[SERVER], ok=202)},
    "/containers/{server}/export": {"post": _op(
        "start an export (202, an operation to poll): an LXD backup of your container "
        "(snapshots included), and of its home volume if it has one, in the site's export "
        "folder", params=[SERVER], ok=202)},
    "/containers/{server}/snapshots": {
        "get": _op("its snapshots", params=[SERVER]),
        "post": _op("take a snapshot (no name: a time stamp)", params=[SERVER],
                    body={"name": {"type": "string"}}, ok=201)},
    "/containers/{server}/snapshot-schedule": {
        "get": _op("the container's snapshot schedule", params=[SERVER]),
        "put": _op("snapshots taken by LXD @hourly, @daily or @weekly, the newest KEEP kept "
                   "(schedule \"\": none)", params=[SERVER],
                   body={"schedule": {"type": "string", "enum": ["", "@hourly", "@daily",
                                                                 "@weekly"]},
                         "keep": {"type": "integer", "minimum": 1}})},
    "/containers/{server}/snapshots/{name}/restore": {
        "post": _op("put the container back to a snapshot", params=[SERVER, NAME])},
    "/containers/{server}/snapshots/{name}": {
        "delete": _op("delete a snapshot", params=[SERVER, NAME])},
    "/containers/{server}/gpus": {
        "get": _op("the server's GPUs (nvidia-smi's order: index, UUID, model) and which are "
                   "your container's", params=[SERVER]),
        "put": _op("choose your container's GPUs: \"all\" (the default) or a list of UUIDs "
                   "or indexes; applied at once", params=[SERVER],
                   body={"gpus": {"oneOf": [{"type": "string", "enum": ["all"]},
                                            {"type": "array"}]}})},
    "/containers/{server}/forwards": {
        "get": _op("your port forwards there", params=[SERVER]),
        "post": _op("forward a host port to a container port", params=[SERVER],
                    body={"port": {"type": "integer"}}, ok=201)},
    "/containers/{server}/forwards/{port}": {
        "delete": _op("remove a forward", params=[SERVER, PORT])},
    "/ssh-config": {"get": _op("an ~/.ssh/config with a Host per GPU server", text=True,
                               params=[{"name": "identity", "in": "query",
                                        "schema": {"type": "string"}}])},
    "/operations": {"get": _op("your long operations (rebuilds, exports), running and "
                               "ended in the last hour, newest first")},
    "/operations/{op_id}": {"get": _op(
        "one operation: status running, done (result) or failed (message, code); step says "
        "what it is doing", params=[
            {"name": "op_id", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "wait", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0, "maximum": 60},
             "description": "answer when it ends or its step changes, or after this many "
                            "seconds"}])},
    "/admin/users": {"get": _op("every user", admin=True)},
    "/admin/users/{name}": {"delete": _op(
        "remove a user: hub servers stopped, tokens revoked, keys and forwards deleted, "
        "containers stopped and kept (containers=keep) or deleted with their homes "
        "(containers=delete); each step audited", admin=True, params=[
            {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "containers", "in": "query", "required": True,
             "schema": {"type": "string", "enum": ["keep", "delete"]}}])},
    "/admin/containers": {"get": _op("every lxcgpu container on every server", admin=True)},
    "/admin/audit": {"get": _op("the audit log, newest first", admin=True, params=[
        {"name": "user", "in": "query", "schema": {"type": "string"}},
        {"name": "q", "in": "query", "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 5000}}])},
    "/admin/push-keys": {"post": _op("write the store's keys and port maps into containers "
                                     "again (one user, or everyone)", admin=True,
                                     body={"user": {"type": "string"}})},
}


def document(prefix: str) -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "keyportal", "version": "1",
                 "description": "Your SSH keys, containers, snapshots and port forwards on "
                                "the lab's GPU servers. A JupyterHub token in the "
                                "Authorization header; never in the URL."},
        "servers": [{"url": f"{prefix}api/v1"}],
        "paths": PATHS,
        "components": {
            "securitySchemes": {"token": {"type": "apiKey", "in": "header",
                                          "name": "Authorization",
                                          "description": "token <a JupyterHub token>"}},
            "schemas": {"Error": {"type": "object", "required": ["status", "message"],
                                  "properties": {"status": {"type": "integer"},
                                                 "message": {"type": "string"}}}},
        },
    }


def listing() -> list[str]:
    """``METHOD path`` for each operation, for the index."""
    return [f"{method.upper()} {path.lstrip('/')}" for path, ops in PATHS.items()
            for method in ops]
