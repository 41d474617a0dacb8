"""Site settings from TOML: defaults, the full layout, and clear errors."""

import os
import socket

import pytest

from lxcspawner import store
from lxcspawner.container import IDMAP_USER_FIRST, Mount
from lxcspawner.settings import DEFAULT_PATH, ENV_VAR, Settings, SettingsError

FULL = """
[store]
url = "sqlite:////srv/lxcgpu/lab.sqlite"
[ports]
ssh = "23000-23999"
forward = "12000-12099"
forward_limit = 3
[server]
name = "gpu17"
lxd = "/var/snap/lxd/common/lxd/unix.socket"
[containers]
prefix = "lab"
image = "lxcgpu/cuda"
profiles = ["lxcgpu", "extra"]
cpu = 8
memory = "64GiB"
processes = 4096
mounts = ["/data:/data:ro", "/scratch:/scratch:rw", "/nas/lab:/lab"]
"""


def load(tmp_path, text, name="lxcgpu.toml"):
    path = tmp_path / name
    path.write_text(text)
    return Settings.load(path, environ={})


def test_defaults_match_the_store():
    s = Settings()
    assert s.store_url == store.DEFAULT_URL
    assert s.ssh_ports == store.SSH_PORTS == (22000, 29999)
    assert s.forward_ports == store.FORWARD_PORTS == (11000, 11999)
    assert s.forward_limit == store.FORWARD_LIMIT == 10
    assert s.server == socket.gethostname().split(".")[0].lower()
    assert (s.lxd, s.instance_prefix, s.image, s.profiles) == (
        None, "", "lxcgpu/default", ("lxcgpu",))
    assert (s.cpu, s.memory, s.processes, s.mounts) == (None, None, None, ())


def test_hub_for_remote_servers(tmp_path):
    s = load(tmp_path, '[ports]\njupyter = "30000-30999"\n[hub]\n'
                       'url = "https://hub.lab.example.org:8000/"\naddress = "192.0.2.10"\n')
    assert s.jupyter_ports == (30000, 30999)
    assert s.hub_for_remote("gpu18") == "https://hub.lab.example.org:8000"
    assert Settings().jupyter_ports == store.JUPYTER_PORTS == (20000, 21999)
    half = load(tmp_path, '[hub]\naddress = "192.0.2.10"\n', name="half.toml")
    with pytest.raises(SettingsError, match=r"Jupyter on gpu18, a GPU server the hub reaches "
                                            r"over the network, needs \[hub\] url in .*half"):
        half.hub_for_remote("gpu18")


def test_full_file(tmp_path):
    s = load(tmp_path, FULL)
    assert s.store_url == "sqlite:////srv/lxcgpu/lab.sqlite"
    assert (s.ssh_ports, s.forward_ports, s.forward_limit) == ((23000, 23999), (12000, 12099), 3)
    assert (s.server, s.lxd) == ("gpu17", "/var/snap/lxd/common/lxd/unix.socket")
    assert (s.instance_prefix, s.image, s.profiles) == ("lab", "lxcgpu/cuda", ("lxcgpu", "extra"))
    assert (s.cpu, s.memory, s.processes) == ("8", "64GiB", 4096)
    assert s.mounts == (Mount("/data", "/data"), Mount("/scratch", "/scratch", readonly=False),
                        Mount("/nas/lab", "/lab"))
    assert s.source == str(tmp_path / "lxcgpu.toml")


def test_partial_file_keeps_other_defaults(tmp_path):
    s = load(tmp_path, '[server]\nname = "node-3"\n[containers]\ncpu = "0-3"\n')
    assert (s.server, s.cpu, s.image, s.ssh_ports) == ("node-3", "0-3", "lxcgpu/default",
                                                       (22000, 29999))
    assert load(tmp_path, "") == Settings()


def test_container_spec_from_settings(tmp_path):
    s = load(tmp_path, FULL)
    spec = s.container_spec("alice", IDMAP_USER_FIRST)
    assert spec.name == "lab-alice--gpu17"
    cfg, devs = spec.config(), spec.devices()
    assert (cfg["limits.cpu"], cfg["limits.memory"], cfg["limits.processes"]) == (
        "8", "64GiB", "4096")
    assert spec.image == "lxcgpu/cuda" and spec.profiles == ("lxcgpu", "extra")
    assert devs["lxcgpu-mnt-data"] == {"type": "disk", "source": "/data", "path": "/data",
                                       "readonly": "true"}
    over = s.container_spec("alice", IDMAP_USER_FIRST, server="gpu18", prefix="", cpu=None)
    assert over.name == "alice--gpu18" and "limits.cpu" not in over.config()
    with pytest.raises(TypeError):
        s.container_spec("alice", IDMAP_USER_FIRST, user="bob")


def test_path_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "site.toml"
    path.write_text('[server]\nname = "gpu9"\n')
    assert Settings.load(environ={ENV_VAR: str(path)}).server == "gpu9"
    monkeypatch.setenv(ENV_VAR, str(path))
    assert Settings.load().server == "gpu9"


def test_missing_files(tmp_path, monkeypatch):
    # A named file must exist, from the argument or the environment ...
    with pytest.raises(SettingsError, match="does not exist"):
        Settings.load(tmp_path / "nope.toml", environ={})
    with pytest.raises(SettingsError, match="nope.toml does not exist"):
        Settings.load(environ={ENV_VAR: str(tmp_path / "nope.toml")})
    # ... the default one may be absent (and is, on this test machine).
    assert not os.path.exists(DEFAULT_PATH)
    assert Settings.load(environ={}) == Settings()
    assert Settings.load(environ={ENV_VAR: ""}) == Settings()


@pytest.mark.parametrize("text, match", [
    ('[stor]\nurl = "x"\n', r"unknown section \[stor\]"),
    ('[ports]\nsssh = "1-2"\n', r"unknown key 'sssh' in \[ports\]"),
    ('[containers]\nmount = []\n', r"unknown key 'mount' in \[containers\]"),
    ('store = "x"\n', r"unknown section \[store\]|\[store\] must be a table"),
    ('[ports]\nforward_limit = "10"\n', r"\[ports\] forward_limit: must be an integer"),
    ('[ports]\nforward_limit = true\n', r"\[ports\] forward_limit: must be an integer"),
    ('[ports]\nforward_limit = -1\n', r"forward_limit must be a whole number"),
    ('[ports]\nssh = 22000\n', r"\[ports\] ssh: must be a range string"),
    ('[ports]\nssh = "22000"\n', r"\[ports\] ssh: .*22000-29999"),
    ('[ports]\nssh = "30000-20000"\n', r"\[ports\] ssh"),
    ('[ports]\nssh = "11500-12500"\n', r"overlap"),
    ('[ports]\njupyter = "21000-22001"\n', r"The SSH port range 22000-29999 and the Jupyter port range 21000-22001 overlap"),
    ('[ports]\njupyter = "20000-20000"\n', r"a pair per user"),
    ('[hub]\nurl = "hub.lab.example.org"\n', r"\[hub\] url 'hub.lab.example.org': the hub's"),
    ('[hub]\nurl = "https://hub/hub/api"\n', r"\[hub\] url"),
    ('[hub]\naddress = "hub.lab.example.org"\n', r"\[hub\] address .*IPv4 address"),
    ('[hub]\naddress = "2001:db8::1"\n', r"\[hub\] address"),
    ('[hub]\nport = 8000\n', r"unknown key 'port' in \[hub\] \(known: url, address\)"),
    ('[containers]\nprofiles = "lxcgpu"\n', r"\[containers\] profiles: must be a list"),
    ('[containers]\nprofiles = ["lxcgpu", 3]\n', r"profiles: must be a list of strings"),
    ('[containers]\ncpu = 1.5\n', r"\[containers\] cpu: must be an integer or a CPU list"),
    ('[containers]\ncpu = "four"\n', r"cpu limit 'four'"),
    ('[containers]\nmemory = "lots"\n', r"memory limit 'lots'"),
    ('[containers]\nprocesses = 0\n', r"processes limit"),
    ('[containers]\nmounts = ["data:/data"]\n', r"\[containers\] mounts: mount source"),
    ('[containers]\nmounts = ["/a:/d", "/b:/d"]\n', r"same container path"),
    ('[containers]\nmounts = ["/a:/d:rx"]\n', r"SOURCE:PATH\[:ro\|rw\]"),
    ('[containers]\nprefix = "Lab_1"\n', r"instance prefix 'Lab_1'"),
    ('[containers]\nimage = ""\n', r"image must be"),
    ('[server]\nname = "GPU17"\n', r"'GPU17' is not a GPU server name"),
    ('[server]\nname = "gpu_17"\n', r"'gpu_17' is not a GPU server name"),
    ('[server]\nlxd = "gpu17:8443"\n', r"\[server\] lxd 'gpu17:8443': a unix socket path"),
    ('[server]\nlxd = "https://gpu17:8443"\n', r"is a \[servers.<name>\] table"),
    ('[servers.gpu17]\n[server]\nname = "gpu17"\n', r"\[server\] is the one-server form"),
    ('[servers]\n', r"one \[servers.<name>\] table per GPU server"),
    ('[servers.GPU17]\n', r"\[servers.GPU17\]: 'GPU17' is not a GPU server name"),
    ('[servers.gpu17]\nhost = "x"\n', r"unknown key 'host' in \[servers.gpu17\]"),
    ('[servers.gpu17]\nlxd = 8443\n', r"\[servers.gpu17\]: must be a string"),
    ('[servers.gpu17]\nlxd = "gpu17:8443"\n', r"must be a unix socket path or https://"),
    ('[servers.gpu18]\nlxd = "https://gpu18:8443"\nclient_cert = "/c"\n',
     r"needs client_key, server_cert"),
    ('[servers.gpu17]\nserver_cert = "/c"\n', r"for LXD over https:// only"),
    ('[servers.gpu17]\nproject = "a b"\n', r"project 'a b' is not an LXD project name"),
    ('[server]\nlxd = 8443\n', r"\[server\] lxd: must be a string"),
    ('[store]\nurl = ""\n', r"store url"),
    ('[store\nurl = "x"\n', r"not valid TOML"),
])
def test_errors_name_the_file_and_key(tmp_path, text, match):
    with pytest.raises(SettingsError, match=match) as e:
        load(tmp_path, text)
    assert str(e.value).startswith(str(tmp_path / "lxcgpu.toml") + ": ")


def test_errors_are_value_errors():
    assert issubclass(SettingsError, ValueError)
    with pytest.raises(ValueError, match="server name"):
        Settings(server="bad name")


def test_bad_hostname_asks_for_a_server_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "My_Box.lab.example")
    with pytest.raises(ValueError, match=r"'my_box' is not a GPU server name.*short hostname: "
                                          r"name the GPU server in a \[servers.<name>\]"):
        Settings()
    monkeypatch.setattr(socket, "gethostname", lambda: "GPU17.lab.example")
    assert Settings().server == "gpu17"


def test_settings_are_frozen():
    s = Settings(server="gpu1")
    with pytest.raises(AttributeError):
        s.image = "other"


def test_open_store(tmp_path):
    s = Settings.from_dict({"store": {"url": f"sqlite:///{tmp_path}/s.sqlite"},
                            "ports": {"ssh": "23000-23001", "forward_limit": 2},
                            "server": {"name": "gpu1"}})
    st = s.open_store(subuid_file=str(tmp_path / "none"))
    try:
        assert (st.ssh_ports, st.forward_ports, st.forward_limit) == (
            (23000, 23001), (11000, 11999), 2)
        assert st.ensure_user("alice").ssh_port == 23000
    finally:
        st.close()


def test_first_id_block_moves_the_stores_id_range(tmp_path):
    from lxcspawner.container import IDMAP_BLOCK, IDMAP_USER_FIRST

    s = Settings.from_dict({"store": {"url": f"sqlite:///{tmp_path / 's.sqlite'}",
                                      "first_id_block": 14800}})
    st = s.open_store(subuid_file=str(tmp_path / "none"))
    try:
        assert st.ensure_user("alice").idmap_base == IDMAP_USER_FIRST + 14800 * IDMAP_BLOCK
    finally:
        st.close()
    for bad in (-1, 10**6, "12", True):
        with pytest.raises((SettingsError, ValueError, TypeError)):
            Settings.from_dict({"store": {"first_id_block": bad}})


def test_servers_one_table_each_in_order_the_first_the_default(tmp_path):
    s = load(tmp_path, """
[servers.gpu18]
address = "gpu18.lab.example.org"
[servers.gpu17]
lxd = "https://gpu17.lab.example.org:8443"
client_cert = "/etc/lxcgpu/lxd-client.crt"
client_key = "/etc/lxcgpu/lxd-client.key"
server_cert = "/etc/lxcgpu/servers/gpu17.crt"
project = "lab"
""")
    assert s.server_names == ("gpu18", "gpu17") and s.server == "gpu18"
    local, remote = s.servers
    assert not local.remote and local.lxd is None and local.ssh_host == "gpu18.lab.example.org"
    assert remote.remote and remote.ssh_host == "gpu17" and remote.project == "lab"
    assert s.gpu_server("gpu17") is remote and s.gpu_server() is local
    with pytest.raises(SettingsError, match=r"unknown GPU server 'gpu19'.*gpu18, gpu17"):
        s.gpu_server("gpu19")
    with pytest.raises(SettingsError, match=r"'GPU 1' is not a GPU server name"):
        s.gpu_server("GPU 1")
    lxd = s.open_lxd("gpu17")
    try:
        assert lxd.endpoint == remote.lxd and lxd.project == "lab"
        assert lxd.cert == (remote.client_cert, remote.client_key)
        assert lxd.verify == remote.server_cert      # pinned, never the system CAs
    finally:
        lxd.close()


def test_the_one_server_form_is_one_server(tmp_path):
    s = load(tmp_path, '[server]\nname = "gpu17"\nlxd = "/run/lxd.socket"\n')
    assert s.server_names == ("gpu17",)
    assert s.servers[0].lxd == "/run/lxd.socket" and not s.servers[0].remote


def test_one_server_name_rule_everywhere():
    from lxcspawner import jupyter, naming, store

    for good in ("gpu17", "node-2", "a"):
        assert naming.is_server_name(good)
        assert jupyter.unit_name(good).endswith(good)
        assert store._check_server(good) == good
    for bad in ("17gpu", "GPU17", "gpu_17", "gpu17-", "", "x" * 64, None, "gpu17.lab"):
        assert not naming.is_server_name(bad)
        with pytest.raises(ValueError, match="not a GPU server name"):
            jupyter.unit_name(bad or "?")
        with pytest.raises(ValueError, match="not a GPU server name"):
            store._check_server(bad)
        with pytest.raises(ValueError, match="not a GPU server name"):
            Settings.from_dict({"servers": {bad or "?": {}}} if isinstance(bad, str) else
                               {"server": {"name": "?"}}).gpu_server()


def test_a_pinned_certificate_that_is_no_certificate_is_named(tmp_path):
    import asyncio

    from lxcspawner.lxd import LXDError

    for name in ("client.crt", "client.key", "gpu18.crt"):
        (tmp_path / name).write_text("not a certificate\n")
    s = load(tmp_path, f"""
[servers.gpu18]
lxd = "https://127.0.0.1:1"
client_cert = "{tmp_path / 'client.crt'}"
client_key = "{tmp_path / 'client.key'}"
server_cert = "{tmp_path / 'gpu18.crt'}"
""")
    lxd = s.open_lxd("gpu18", retries=0)
    try:
        with pytest.raises(LXDError, match=r"the certificate pinned for https://127.0.0.1:1 "
                                            r"\(.*gpu18.crt\) cannot be used"):
            asyncio.run(lxd.server_info())
    finally:
        lxd.close()


def test_portal_snapshot_limit(tmp_path):
    assert load(tmp_path, "").snapshot_limit == 10
    assert load(tmp_path, "[portal]\nsnapshot_limit = 3\n").snapshot_limit == 3
    with pytest.raises(SettingsError, match="snapshot_limit"):
        load(tmp_path, "[portal]\nsnapshot_limit = -1\n")
    with pytest.raises(SettingsError, match="snapshots"):
        load(tmp_path, "[portal]\nsnapshots = 3\n")


def test_the_monitor_settings_and_each_agents_address(tmp_path):
    s = Settings.from_dict({
        "monitor": {"agent_port": 19101, "idle_minutes": 10, "disks": ["/", "/data"],
                    "public": True, "poll_seconds": 2},
        "servers": {"gpu17": {}, "gpu18": {"lxd": "https://10.9.8.7:8443", "client_cert": "/c",
                                           "client_key": "/k", "server_cert": "/s"},
                    "gpu19": {"agent": "http://gpu19-mgmt:9200"}}})
    assert s.agent_url("gpu17") == "http://127.0.0.1:19101"
    assert s.agent_url("gpu18") == "http://10.9.8.7:19101"
    assert s.agent_url("gpu19") == "http://gpu19-mgmt:9200"
    assert (s.idle_minutes, s.monitor_disks, s.monitor_public, s.poll_seconds) == \
        (10, ("/", "/data"), True, 2.0)
    for bad, said in (({"monitor": {"agent_port": 0}}, "agent_port"),
                      ({"monitor": {"token_file": "rel/path"}}, "token_file"),
                      ({"monitor": {"idle_utilization": 101}}, "idle_utilization"),
                      ({"monitor": {"poll_seconds": 0.1}}, "poll_seconds"),
                      ({"monitor": {"disks": ["data"]}}, "disks"),
                      ({"monitor": {"public": "yes"}}, "public"),
                      ({"monitor": {"colour": 1}}, "unknown key 'colour'"),
                      ({"servers": {"a": {"agent": "https://a:1"}}}, "http://HOST:PORT"),
                      ({"servers": {"a": {"agent": "http://a"}}}, "http://HOST:PORT")):
        with pytest.raises(SettingsError, match=said):
            Settings.from_dict(bad)


def test_the_monitor_token_file_must_be_private(tmp_path):
    path = tmp_path / "monitor.token"
    s = Settings.from_dict({"monitor": {"token_file": str(path)}})
    with pytest.raises(SettingsError, match="does not exist"):
        s.monitor_token()
    path.write_text("a" * 40 + "\n")
    path.chmod(0o644)
    with pytest.raises(SettingsError, match="readable by others: chmod 600"):
        s.monitor_token()
    path.chmod(0o600)
    assert s.monitor_token() == "a" * 40
    path.write_text("short\n")
    with pytest.raises(SettingsError, match="at least 32"):
        s.monitor_token()
    link = tmp_path / "link.token"
    link.symlink_to(path)
    with pytest.raises(SettingsError):
        Settings.from_dict({"monitor": {"token_file": str(link)}}).monitor_token()
