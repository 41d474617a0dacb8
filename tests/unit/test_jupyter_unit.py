"""Jupyter's unit inside the container: names and the environment file."""

import pytest

from lxcspawner.jupyter import PATH, UNIT, env_file, unit_name


def test_unit_names():
    assert unit_name("") == UNIT
    assert unit_name("gpu17") == f"{UNIT}-gpu17"
    for bad in ["GPU17", "gpu17;reboot", "../x", "-x", "x" * 64, "a b"]:
        with pytest.raises(ValueError):
            unit_name(bad)


def test_env_file_quotes_everything_and_adds_path():
    text = env_file({"JUPYTERHUB_API_TOKEN": "abc123",
                     "JUPYTERHUB_OAUTH_SCOPES": '["access:servers!server=alice/"]',
                     "WEIRD": 'back\\slash "quoted" $HOME `cmd`'})
    assert text.splitlines() == [
        'JUPYTERHUB_API_TOKEN="abc123"',
        'JUPYTERHUB_OAUTH_SCOPES="[\\"access:servers!server=alice/\\"]"',
        f'PATH="{PATH}"',
        'WEIRD="back\\\\slash \\"quoted\\" $HOME `cmd`"',
    ]


@pytest.mark.parametrize("env", [{"A": "x\ny"}, {"A": "x\ry"}, {"A": "x\0"}, {"1A": "x"},
                                 {"A-B": "x"}, {"A B": "x"}, {"": "x"}])
def test_env_file_refuses_what_systemd_would_misread(env):
    with pytest.raises(ValueError):
        env_file(env)
