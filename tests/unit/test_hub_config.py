"""The hub config's helpers: the bridge address and the state directory's secrets."""

import json
import os
import stat

import pytest

from hub_config.bridge import BridgeError, parse_ipv4
from hub_config.statedir import hub_dir, secret_file


def ip_json(*addrs):
    return json.dumps([{"ifname": "lxcgpubr0", "addr_info": [
        {"family": fam, "local": a, "prefixlen": 24} for fam, a in addrs]}])


def test_bridge_address_is_the_first_ipv4():
    assert parse_ipv4(ip_json(("inet", "10.213.87.1"), ("inet", "10.213.88.1")),
                      "lxcgpubr0") == "10.213.87.1"


@pytest.mark.parametrize("text", ["", "[]", ip_json(("inet6", "fd42::1")), "not json"])
def test_bridge_without_ipv4_says_what_to_do(text):
    with pytest.raises(BridgeError) as e:
        parse_ipv4(text, "lxcgpubr0")
    assert "lxcgpubr0" in str(e.value)


def test_state_dir_is_private(tmp_path):
    d = hub_dir({"LXCGPU_HUB_DIR": str(tmp_path / "hub")})
    assert d == tmp_path / "hub" and stat.S_IMODE(d.stat().st_mode) == 0o700


def test_secret_is_generated_once_private_and_kept(tmp_path):
    path = tmp_path / "proxy_token"
    first = secret_file(path)
    assert len(first) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_file(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["proxy_token"]  # no temp files left


def test_secret_readable_by_others_or_empty_is_refused(tmp_path):
    path = tmp_path / "proxy_token"
    path.write_text("abc\n")
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        secret_file(path)
    os.chmod(path, 0o600)
    path.write_text("\n")
    with pytest.raises(ValueError):
        secret_file(path)


# -- origins, HTTPS, the proxy's user ------------------------------------------

from pathlib import Path  # noqa: E402

from traitlets.config import PyFileConfigLoader  # noqa: E402

from hub_config import tls  # noqa: E402
from hub_config.origins import subdomain_hook  # noqa: E402
from hub_config.proxy import ProxyUserError, unprivileged_command, unreachable  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parents[2] / "hub_config"


def test_users_get_their_own_host_services_stay_on_the_hubs():
    assert subdomain_hook("alice", "lxcgpu.localhost", "user") == "alice.lxcgpu.localhost"
    assert subdomain_hook("keyportal", "lxcgpu.localhost", "service") == "lxcgpu.localhost"
    # Not a DNS label: JupyterHub's idna scheme gives a safe, distinct one.
    odd = subdomain_hook("Al.ice", "lxcgpu.localhost", "user")
    assert odd.endswith(".lxcgpu.localhost") and odd.count(".") == 2


def test_wanted_names_cover_the_hub_every_user_origin_and_loopback():
    names = tls.wanted_names("lxcgpu.localhost", hostname="gpu1", addresses=["192.0.2.7", "fd00::2"])
    assert names == {"DNS:lxcgpu.localhost", "DNS:*.lxcgpu.localhost", "DNS:localhost",
                     "DNS:gpu1", "IP:127.0.0.1", "IP:::1", "IP:192.0.2.7", "IP:fd00::2"}
    assert "DNS:*.192.0.2.7" not in tls.wanted_names("192.0.2.7")


def test_generated_certificate_is_kept_until_a_name_is_missing(tmp_path):
    d = tmp_path / "tls"
    names = tls.wanted_names("lxcgpu.localhost", hostname="gpu1")
    assert tls.ensure_hub_certificate(d, names) is True
    assert tls.subject_alt_names(d / "hub.crt") == names
    assert {p.name for p in d.iterdir()} == {"ca.crt", "hub.crt", "hub.key"}  # no CA key kept
    assert stat.S_IMODE((d / "hub.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "ca.crt").stat().st_mode) == 0o644
    ca = (d / "ca.crt").read_bytes()
    assert tls.ensure_hub_certificate(d, names) is False
    assert (d / "ca.crt").read_bytes() == ca
    fp = tls.fingerprint(d / "ca.crt")
    assert len(fp.split(":")) == 32
    # A new address alone keeps the certificate (and the CA users trust) ...
    assert tls.ensure_hub_certificate(d, names, optional={"IP:192.0.2.9"}) is False
    assert tls.fingerprint(d / "ca.crt") == fp
    # ... a new name makes a new CA and certificate, with the addresses too.
    assert tls.ensure_hub_certificate(d, names | {"DNS:gpu1.lab.example"},
                                      optional={"IP:192.0.2.9"}) is True
    assert {"DNS:gpu1.lab.example", "IP:192.0.2.9"} <= tls.subject_alt_names(d / "hub.crt")
    assert tls.fingerprint(d / "ca.crt") != fp
    # The chain verifies for a user's origin.
    import subprocess
    out = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca.crt"), "-verify_hostname",
                          "alice.lxcgpu.localhost", str(d / "hub.crt")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_proxy_copies_are_its_own_and_the_key_only_it_reads(tmp_path):
    d = tmp_path / "tls"
    tls.ensure_hub_certificate(d, tls.wanted_names("lxcgpu.localhost"))
    cert, key = tls.install_for_proxy(d / "hub.crt", d / "hub.key", tmp_path / "proxy", 4321, 4321)
    assert (key.stat().st_uid, stat.S_IMODE(key.stat().st_mode)) == (4321, 0o400)
    assert stat.S_IMODE(cert.stat().st_mode) == 0o444
    assert (key.parent.stat().st_uid, stat.S_IMODE(key.parent.stat().st_mode)) == (4321, 0o700)
    assert key.read_bytes() == (d / "hub.key").read_bytes()


def test_unreachable_names_the_closed_folder():
    import tempfile
    with tempfile.TemporaryDirectory(prefix="lxcgpu-unit-") as top:  # pytest's are root-only
        check_unreachable(Path(top))


def check_unreachable(tmp_path):
    closed = tmp_path / "closed"
    (closed / "bin").mkdir(parents=True)
    tool = closed / "bin" / "tool"
    tool.write_text("#!/bin/sh\n")
    os.chmod(tool, 0o755)
    os.chmod(tmp_path, 0o755)
    os.chmod(closed, 0o700)
    assert unreachable(tool, 4321, 4321) == closed
    os.chmod(closed, 0o711)
    assert unreachable(tool, 4321, 4321) is None
    os.chmod(tool, 0o700)
    assert unreachable(tool, 4321, 4321) == tool


def test_unknown_proxy_user_says_what_to_do():
    with pytest.raises(ProxyUserError, match="setup/install-deps"):
        unprivileged_command(["/bin/true"], "lxcgpu-no-such-user")


def load_hub_config(tmp_path, monkeypatch, site: str):
    """The shipped config with a site file, as the hub would load it."""
    (tmp_path / "site.py").write_text(
        'c.JupyterHub.hub_bind_url = "http://127.0.0.1:8081"\n' + site)
    monkeypatch.setenv("LXCGPU_HUB_DIR", str(tmp_path / "hub"))
    monkeypatch.setenv("LXCGPU_HUB_SITE", str(tmp_path / "site.py"))
    monkeypatch.setenv("LXCGPU_TLS_DIR", str(tmp_path / "tls"))
    monkeypatch.setenv("LXCGPU_PROXY_DIR", str(tmp_path / "proxy"))
    return PyFileConfigLoader("jupyterhub_config.py", path=str(CONFIG_DIR)).load_config().JupyterHub


def test_default_is_https_with_user_origins_under_lxcgpu_localhost(tmp_path, monkeypatch):
    hub = load_hub_config(tmp_path, monkeypatch, "")
    assert hub.bind_url == "https://:8000"
    assert hub.subdomain_host == "https://lxcgpu.localhost:8000"
    assert hub.cookie_host_prefix_enabled is True
    assert hub.tornado_settings["cookie_options"]["secure"] is True
    assert Path(hub.ssl_cert).exists() and Path(hub.ssl_key).exists()
    assert "DNS:*.lxcgpu.localhost" in tls.subject_alt_names(tmp_path / "tls" / "hub.crt")


def test_plain_http_only_on_loopback(tmp_path, monkeypatch):
    hub = load_hub_config(tmp_path, monkeypatch, 'c.JupyterHub.bind_url = "http://127.0.0.1:8000"\n')
    assert hub.bind_url == "http://127.0.0.1:8000"
    assert hub.subdomain_host == "http://lxcgpu.localhost:8000"
    assert hub.cookie_host_prefix_enabled is False
    assert "ssl_cert" not in hub
    # Every interface: HTTPS whatever the site wrote.
    hub = load_hub_config(tmp_path, monkeypatch, 'c.JupyterHub.bind_url = "http://:8443"\n')
    assert hub.bind_url == "https://:8443" and hub.ssl_cert
    assert hub.subdomain_host == "https://lxcgpu.localhost:8443"


def test_site_may_keep_one_shared_origin(tmp_path, monkeypatch):
    hub = load_hub_config(tmp_path, monkeypatch, 'c.JupyterHub.subdomain_host = ""\n')
    assert hub.subdomain_host == "" and hub.cookie_host_prefix_enabled is False
    assert hub.bind_url == "https://:8000"


@pytest.mark.skipif(os.geteuid() != 0, reason="the proxy drops privileges only from root")
def test_proxy_is_started_as_its_own_user(tmp_path, monkeypatch):
    import pwd
    load_hub_config(tmp_path, monkeypatch, "")
    cfg = PyFileConfigLoader("jupyterhub_config.py", path=str(CONFIG_DIR)).load_config()
    command = cfg.ConfigurableHTTPProxy.command
    proxy = pwd.getpwnam("lxcgpu-proxy")
    assert Path(command[0]).name == "setpriv"
    assert f"--reuid={proxy.pw_uid}" in command and "--no-new-privs" in command
    assert Path(cfg.JupyterHub.ssl_key).parent == tmp_path / "proxy"
    assert Path(cfg.JupyterHub.ssl_key).stat().st_uid == proxy.pw_uid


@pytest.mark.skipif(os.geteuid() != 0, reason="the proxy drops privileges only from root")
def test_proxy_on_port_443_keeps_only_the_bind_capability(tmp_path, monkeypatch):
    import subprocess
    cfg = load_hub_config(tmp_path, monkeypatch, 'c.JupyterHub.bind_url = "https://:443"\n')
    assert cfg.subdomain_host == "https://lxcgpu.localhost"
    command = unprivileged_command(["/bin/cat", "/proc/self/status"], low_port=True)
    status = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    caps = {k: int(v, 16) for k, v in (line.split(":") for line in status.splitlines()
                                       if line.startswith("Cap"))}
    assert caps["CapEff"] == caps["CapBnd"] == caps["CapAmb"] == 1 << 10  # CAP_NET_BIND_SERVICE


def test_lab_sync_has_only_the_scopes_it_needs_and_no_secret_on_its_command_line():
    import json

    from hub_config.labsync import ENV_VAR, LXCGPULabSync

    sync = LXCGPULabSync(interval=60)
    svc = sync.service({"lookup_dn_search_password": "s3cret"})
    assert "s3cret" not in " ".join(svc["command"])
    assert json.loads(svc["environment"][ENV_VAR])["ldap"]["lookup_dn_search_password"] == "s3cret"
    assert sorted(sync.role()["scopes"]) == sorted(
        ["list:users", "read:users", "read:servers", "delete:servers", "read:tokens", "tokens"])


def test_the_gpu_servers_come_from_the_site_file_only(tmp_path, monkeypatch):
    site = tmp_path / "lxcgpu.toml"
    site.write_text("[servers.gpu17]\n[servers.gpu18]\n")
    monkeypatch.setenv("LXCGPU_CONFIG", str(site))
    hub = load_hub_config(tmp_path, monkeypatch, "")
    assert hub.named_server_limit_per_user == 2     # one named server per GPU server
    with pytest.raises(ValueError, match=r"c.LXCSpawner.servers moved to the lxcgpu site file"):
        load_hub_config(tmp_path, monkeypatch, 'c.LXCSpawner.servers = {"gpu1": {}}\n')
