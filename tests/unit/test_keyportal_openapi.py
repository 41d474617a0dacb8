"""keyportal's OpenAPI description is the API: every route the service
answers is described, with the methods its handler has, and nothing more."""

from __future__ import annotations

import re

from keyportal import app, openapi

METHODS = ("get", "post", "delete", "put", "patch")


def _described(pattern: str) -> list[str]:
    """The OpenAPI paths one route pattern answers ({action} expanded)."""
    action = re.search(r"\(\?P<action>([^)]*)\)", pattern)
    options = action.group(1).split("|") if action else [None]
    out = []
    for option in options:
        p = pattern if option is None else pattern.replace(action.group(0), option)
        out.append("/" + re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", p))
    return out


def test_every_route_is_described_with_its_methods():
    seen = set()
    for pattern, handler in app.api_routes():
        methods = {m for m in METHODS if m in vars(handler)}
        assert methods, handler
        for path in _described(pattern):
            assert path in openapi.PATHS, path
            assert set(openapi.PATHS[path]) == methods, (path, methods)
            seen.add(path)
    assert seen == set(openapi.PATHS)


def test_the_document_and_the_index():
    doc = openapi.document("/services/keyportal/")
    assert doc["openapi"].startswith("3.") and doc["servers"][0]["url"].endswith("/api/v1")
    for path, ops in doc["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for op in ops.values():
            assert {p["name"] for p in op["parameters"] if p["in"] == "path"} == names, path
    assert "POST containers/{server}/snapshots/{name}/restore" in openapi.listing()
