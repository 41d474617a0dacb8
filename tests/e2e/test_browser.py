"""A researcher's first visit, in a real browser: log in with an LDAP
password, watch the spawn's progress, land in JupyterLab inside their own
container and run code there.

Everything is real: the shipped hub config, the proxy, the test slapd, LXD
and the template image; the browser is Debian's chromium driven by
Playwright.  Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time

import pytest
from playwright.async_api import expect

from lxcspawner import naming
from tests.fixtures.browser import log_in, recording_page

pytestmark = [pytest.mark.lxd, pytest.mark.ldap]

SERVER = "node1"  # the hub fixture's only GPU server
SPAWN_TIMEOUT = 180_000  # ms: a first spawn creates and boots the container
LAB_TIMEOUT = 90_000  # ms: JupyterLab's first load, a kernel's first start
CODE = "import getpass, socket; print(socket.gethostname(), getpass.getuser())"


async def wait_stopped(hub, user: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while "" in hub.api("GET", f"/users/{user}").json().get("servers", {}):
        assert time.monotonic() < deadline, f"server not stopped\n{hub.log_tail(3000)}"
        await asyncio.sleep(0.2)


@pytest.fixture
async def new_researcher(hub, ldap_directory):
    """A user the hub has never seen, in gpu-users: (name, password)."""
    name = f"{hub.run_tag}lab"
    password = secrets.token_urlsafe(12)
    ldap_directory.add_user(name, password, groups=["gpu-users"])
    yield name, password
    hub.api("DELETE", f"/users/{name}/server")


async def test_login_spawn_and_run_code_in_jupyterlab(hub, lxd, browser, artifacts,
                                                     new_researcher, logs_on_failure):
    name, password = new_researcher
    login = naming.posix_name(name)
    instance = naming.instance_name(name, SERVER, hub.run_tag)
    logs_on_failure.append(instance)
    (artifacts / "e2e-failure.png").unlink(missing_ok=True)  # from an earlier run

    # The hub's certificate comes from its own generated CA, which this
    # browser profile is not given (tests/integration checks it with that CA).
    context, page, progress = await recording_page(browser)
    try:
        # Log in on the hub's own form.
        await log_in(page, hub, name, password)

        # A new user goes straight to their spawn, which shows our real steps.
        await page.wait_for_url(f"**/hub/spawn-pending/{name}**", timeout=30_000)
        await expect(page.locator("#progress-log .progress-log-event")
                     .filter(has_text="creating container")).to_be_attached(timeout=30_000)
        await page.screenshot(path=artifacts / "e2e-spawn-pending.png")

        # Then JupyterLab in the container, through the proxy, on the user's
        # own origin.
        await page.wait_for_url(f"{hub.user_url(name)}lab**", timeout=SPAWN_TIMEOUT)
        messages = [m for m, _ in progress]
        steps = ["creating container", "starting container", "preparing user",
                 "starting Jupyter"]
        assert [m for m in messages if m in steps] == steps, progress
        bar = [pct for _, pct in progress]
        assert bar == sorted(bar) and bar[-1] == 100, progress
        assert progress[-1][0].startswith("Server ready"), progress

        # A Python 3 notebook from the Launcher; run the code in its first cell.
        card = page.locator('.jp-LauncherCard[data-category="Notebook"]').first
        await card.click(timeout=LAB_TIMEOUT)
        # A cell run before the new kernel was connected was seen to be
        # skipped without a word: wait for the status bar's "Python 3 (ipykernel) | Idle".
        kernel_idle = page.get_by_role("contentinfo").get_by_role(
            "button", name=re.compile(r"Python 3.*\|\s*Idle"))
        await expect(kernel_idle).to_be_visible(timeout=LAB_TIMEOUT)
        editor = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) "
                              ".jp-Notebook .jp-CodeCell .cm-content").first
        await editor.click(timeout=LAB_TIMEOUT)
        await page.keyboard.type(CODE)
        await expect(editor).to_have_text(CODE)
        await page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output").first
        expected = f"{naming.hostname(name, SERVER)} {login}"
        await expect(output).to_have_text(re.compile(rf"^\s*{re.escape(expected)}\s*$"),
                                          timeout=LAB_TIMEOUT)
        await page.screenshot(path=artifacts / "e2e-jupyterlab.png")
    except BaseException:
        with contextlib.suppress(Exception):  # keep the test's own error
            await page.screenshot(path=artifacts / "e2e-failure.png")
        raise
    finally:
        await context.close()

    # Stopping the server stops Jupyter only: the container keeps running.
    r = hub.api("DELETE", f"/users/{name}/server")
    assert r.status_code in (202, 204), r.text
    await wait_stopped(hub, name)
    assert (await lxd.state(instance)).running
