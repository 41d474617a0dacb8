"""keyportal's page in a real browser: a researcher logs in on the hub,
follows the hub's "Keys & containers" link, adds a key (a pasted private key
is refused), creates their container, takes a snapshot and restores it
(only once the confirmation is ticked); a form posted with their session
but without the page's XSRF token changes nothing.  Screenshots go to
``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import re
import secrets

import pytest
from playwright.async_api import expect

from lxcspawner import naming
from tests.fixtures.browser import log_in
from tests.fixtures.sshkeys import keypair

pytestmark = [pytest.mark.lxd, pytest.mark.ldap]

SERVER = "node1"


async def _researcher(hub, ldap_directory, lxd, suffix: str):
    name = f"{hub.run_tag}{suffix}"
    password = secrets.token_urlsafe(12)
    ldap_directory.add_user(name, password, groups=["gpu-users"])
    yield name, password
    hub.api("DELETE", f"/users/{name}/server")
    await lxd.delete_instance(naming.instance_name(name, SERVER, hub.run_tag))


@pytest.fixture
async def researcher(hub, ldap_directory, lxd):
    async for who in _researcher(hub, ldap_directory, lxd, "pg"):
        yield who


@pytest.fixture
async def another_researcher(hub, ldap_directory, lxd):
    async for who in _researcher(hub, ldap_directory, lxd, "pa"):
        yield who


async def test_keys_and_containers_page(hub, lxd, browser, artifacts, researcher, tmp_path):
    name, password = researcher
    _, pub = keypair(tmp_path, "page")
    context = await browser.new_context(viewport={"width": 1280, "height": 1000},
                                        ignore_https_errors=True)
    page = await context.new_page()
    try:
        await log_in(page, hub, name, password)
        # A new user's first login starts their server (and container).
        await page.wait_for_url(f"{hub.user_url(name)}lab**", timeout=180_000)
        # The hub's own navigation bar links to the portal.
        await page.goto(f"{hub.url}/hub/token")
        await page.click("text=Keys & containers")
        await page.wait_for_url("**/services/keyportal/", timeout=30_000)
        await expect(page.locator("h2", has_text="SSH keys")).to_be_visible()

        # A private key pasted by mistake: refused, said, not stored.
        await page.fill("#key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n"
                                "-----END OPENSSH PRIVATE KEY-----")
        await page.click("#add-key button[type=submit]")
        await expect(page.locator("#flash.alert-danger")).to_contain_text("private key")
        await expect(page.locator("#keys")).to_contain_text("No keys yet")

        await page.fill("#key", pub)
        await page.click("#add-key button[type=submit]")
        await expect(page.locator("#flash.alert-success")).to_contain_text("key added")
        await expect(page.locator("#keys")).to_contain_text(pub.split()[2])

        # Posting with the session but without the page's XSRF token: refused.
        # (A script on the page itself, with every cookie, but no _xsrf.)
        forged = await page.evaluate("""async key => {
            const r = await fetch("/services/keyportal/keys/add", {
                method: "POST", body: new URLSearchParams({key}), redirect: "manual"});
            return r.type === "opaqueredirect" ? "redirect" : r.status;
        }""", keypair(tmp_path, "forged")[1])
        assert forged == 403, forged
        await page.reload()
        await expect(page.locator("#keys tbody tr")).to_have_count(1)
        await page.screenshot(path=artifacts / "portal-keys.png", full_page=True)

        # The first login made the container; stopped, it offers Start.
        card = page.locator(f"#server-{SERVER}")
        await expect(card.locator(".state")).to_have_text("running")
        stop = card.locator("form[action$='/stop']")
        await stop.locator("input[name=confirm]").check()
        await stop.locator("button").click()
        await expect(card.locator(".state")).to_have_text("stopped", timeout=120_000)
        await card.locator("button", has_text="Start").click()
        await expect(card.locator(".state")).to_have_text("running", timeout=180_000)
        await expect(card.locator("input[aria-label='ssh command']")).to_have_value(
            re.compile(r"^ssh -p \d+ "))
        instance = naming.instance_name(name, SERVER, hub.run_tag)
        login = naming.posix_name(name)
        await lxd.put_file(instance, f"/home/{login}/data.txt", "original\n")
        await card.locator("input[name=name]").fill("first")
        await card.locator("button", has_text="Take snapshot").click()
        await expect(page.locator("#flash.alert-success")).to_contain_text("snapshot first made")
        await lxd.put_file(instance, f"/home/{login}/data.txt", "damaged\n")

        restore = card.locator("form[action$='/restore']")
        await restore.locator("button").click()                 # not ticked
        await expect(page.locator("#flash.alert-danger")).to_contain_text("tick the box")
        assert await lxd.get_file(instance, f"/home/{login}/data.txt") == b"damaged\n"
        await restore.locator("input[name=confirm]").check()
        await restore.locator("button").click()
        await expect(page.locator("#flash.alert-success")).to_contain_text("back at first",
                                                                         timeout=120_000)
        assert await lxd.get_file(instance, f"/home/{login}/data.txt") == b"original\n"
        # Automatic snapshots: daily, the newest 3 kept; a bad "keep" is refused.
        schedule = card.locator("form.schedule")
        await schedule.locator("select").select_option("@daily")
        await schedule.locator("input[name=keep]").fill("999")
        await schedule.locator("button").click()
        await expect(page.locator("#flash.alert-danger")).to_contain_text("keep:")
        await schedule.locator("select").select_option("@daily")
        await schedule.locator("input[name=keep]").fill("3")
        await schedule.locator("button").click()
        await expect(page.locator("#flash.alert-success")).to_contain_text(
            "automatic snapshots daily, the newest 3 kept")
        await expect(schedule.locator("select")).to_have_value("@daily")
        assert (await lxd.instance(instance))["config"]["snapshots.schedule"] == "@daily"
        # Rebuild: only with its box ticked; the home and the schedule stay.
        await lxd.put_file(instance, "/usr/local/bin/mine", "#!/bin/sh\n", mode=0o755)
        rebuild = card.locator("form.rebuild")
        await rebuild.locator("button").click()
        await expect(page.locator("#flash.alert-danger")).to_contain_text("tick the box")
        assert await lxd.file_entry(instance, "/usr/local/bin/mine") is not None
        await rebuild.locator("input[name=confirm]").check()
        await rebuild.locator("button").click()
        # It runs as an operation: the card follows its steps, then the
        # page reloads with the outcome.
        await expect(page.locator("#flash.alert-success")).to_contain_text(
            "rebuilding your container")
        operation = card.locator(".operation").first
        await expect(operation).to_contain_text("Rebuild")
        await expect(card.locator(".operation[data-status=done]")).to_contain_text(
            "a new system; your home is as it was", timeout=300_000)
        assert await lxd.file_entry(instance, "/usr/local/bin/mine") is None
        assert await lxd.get_file(instance, f"/home/{login}/data.txt") == b"original\n"
        await expect(schedule.locator("select")).to_have_value("@daily")
        await page.screenshot(path=artifacts / "portal-containers.png", full_page=True)
    except BaseException:
        with contextlib.suppress(Exception):
            await page.screenshot(path=artifacts / "portal-failure.png", full_page=True)
        raise
    finally:
        await context.close()


async def test_admin_page(hub, browser, artifacts, ldap_directory, another_researcher):
    """Hub admins get the portal's admin page (users, containers, the audit
    log with search); a researcher gets 403 and no link to it."""
    name, password = another_researcher
    context = await browser.new_context(viewport={"width": 1280, "height": 1000},
                                        ignore_https_errors=True)
    page = await context.new_page()
    try:
        await log_in(page, hub, name, password)
        r = await page.goto(f"{hub.url}/services/keyportal/admin")
        assert r.status == 403
        await page.goto(f"{hub.url}/services/keyportal/")
        await expect(page.locator("h2", has_text="SSH keys")).to_be_visible()
        await expect(page.locator("a", has_text="lxcgpu admin")).to_have_count(0)
        await context.clear_cookies()

        await log_in(page, hub, "carol", ldap_directory.passwords["carol"])
        await page.goto(f"{hub.url}/services/keyportal/")
        await page.click("a:has-text('lxcgpu admin')")
        await page.wait_for_url("**/services/keyportal/admin", timeout=30_000)
        users = page.locator("#users")
        await expect(users).to_contain_text(naming.posix_name(name))
        # No Remove on the admin's own row (the API refuses it too).
        own = page.locator(f"#user-{naming.posix_name('carol')}")
        await expect(own).to_be_visible()
        await expect(own.locator("form.remove-user")).to_have_count(0)
        # Remove needs its box ticked: nothing happens without it.
        row = page.locator(f"#user-{naming.posix_name(name)}")
        await expect(row.locator("td").nth(3)).to_have_text(re.compile(r"^\d+$"))   # keys
        await row.locator("form.remove-user button").click()
        await expect(page.locator("#flash.alert-danger")).to_contain_text("tick the box")
        await expect(users).to_contain_text(naming.posix_name(name))
        await page.fill("#audit-search input[name=user]", name)
        await page.fill("#audit-search input[name=q]", "user.create")
        await page.click("#audit-search button")
        await expect(page.locator("#audit tbody tr").first).to_contain_text(name)
        await page.screenshot(path=artifacts / "portal-admin.png", full_page=True)
    finally:
        await context.close()
