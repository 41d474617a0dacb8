"""The template image in the real LXD (`setup/build-image` builds it, never these tests)."""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagebuilder import image
from lxcspawner.container import start_container

pytestmark = pytest.mark.lxd

# The console script of the environment running the tests.
BUILDER = [str(Path(sys.executable).with_name("lxcgpu-image"))]


@pytest.fixture(scope="module")
def recipe() -> str:
    """The recipe a plain `lxcgpu-image` would build on this host."""
    out = subprocess.run(
        [*BUILDER, "--print-recipe"], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)["recipe"]


def test_image_has_its_properties(template_image):
    props = template_image["properties"]
    for key in (
        "lxcgpu.recipe",
        "lxcgpu.jupyterhub",
        "lxcgpu.jupyterlab",
        "lxcgpu.python",
        "os",
        "release",
        "description",
    ):
        assert props.get(key), key
    assert len(props["lxcgpu.recipe"]) == 64
    assert template_image["type"] == "container"


def test_image_has_the_hubs_jupyterhub(template_image):
    hub = importlib.metadata.version("jupyterhub")
    assert template_image["properties"]["lxcgpu.jupyterhub"] == hub


def test_second_run_is_a_no_op(template_image, recipe):
    # Never let a test start a build: run the builder only when it will find
    # the image up to date.
    if template_image["properties"]["lxcgpu.recipe"] != recipe:
        pytest.fail(
            f"{image.DEFAULT_ALIAS} was not built from this checkout's recipe (or "
            "was built with other options): run setup/build-image",
            pytrace=False,
        )
    before = template_image["fingerprint"]
    out = subprocess.run(BUILDER, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout
    after = subprocess.run(["lxc", "image", "info", image.DEFAULT_ALIAS], capture_output=True,
                           text=True, check=True).stdout
    assert f"Fingerprint: {before}" in after


async def test_each_container_gets_its_own_identity(
    lxd, template_image, user_containers, logs_on_failure
):
    """Name, machine id and SSH host keys are made per container, not baked in."""
    specs = [await user_containers("imga"), await user_containers("imgb")]
    seen = []
    for spec in specs:
        logs_on_failure.append(spec.name)
        await start_container(lxd, spec.name)

        async def run(*argv: str, name: str = spec.name) -> str:
            return (await lxd.execute(name, list(argv), timeout=90)).check(argv).stdout

        assert (await run("systemctl", "is-system-running", "--wait")).strip() == "running"
        assert (await run("cat", "/etc/hostname")).strip() == spec.name
        assert await run("ss", "-Hltn", "sport", "=", ":22")
        seen.append(
            (
                (await run("cat", "/etc/machine-id")).strip(),
                await run("ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"),
            )
        )
        version = await run("/opt/jupyter/bin/jupyterhub-singleuser", "--version")
        assert version.strip() == template_image["properties"]["lxcgpu.jupyterhub"]
        info = json.loads(await run("cat", image.IMAGE_INFO))
        assert info["recipe"] == template_image["properties"]["lxcgpu.recipe"]
    (id_a, key_a), (id_b, key_b) = seen
    assert id_a and id_b and id_a != id_b
    assert key_a != key_b
