# /etc/lxcgpu/jupyterhub_site.py: this lab's settings for lxcgpu's hub.
#
# Copy this file there (root:root, mode 0644; it holds no secrets) and edit it.
# The shipped hub_config/jupyterhub_config.py loads it last, so anything set
# here wins.  `c` works as in any JupyterHub config file.
# docs/ldap.md explains every LDAP setting; docs/admin.md the GPU servers.
import ssl

c = get_config()  # noqa: F821 - provided by JupyterHub when it loads this file

# --- the directory: where and how securely --------------------------------
# The host name written in the server's certificate (not an IP address).
c.LDAPAuthenticator.server_address = "ldap.example.org"
# StartTLS on 389 (the default and recommended), or LDAPS on 636:
c.LDAPAuthenticator.tls_strategy = "before_bind"      # or "on_connect" for LDAPS
# c.LDAPAuthenticator.server_port = 389                # 636 by default with "on_connect"
# The CA that signed the directory's certificate.  The certificate is always
# checked (lxcgpu adds validate=CERT_REQUIRED); without ca_certs_file only the
# system's public CAs are trusted.
c.LDAPAuthenticator.tls_kwargs = {
    "ca_certs_file": "/etc/lxcgpu/ldap-ca.pem",
    "validate": ssl.CERT_REQUIRED,
}

# --- finding the user's DN: a template ... ----------------------------------
# Enough when every DN is built from the login name (OpenLDAP, FreeIPA):
c.LDAPAuthenticator.bind_dn_template = ["uid={username},ou=people,dc=example,dc=org"]

# --- ... or a search with a read-only service account -----------------------
# Needed for Active Directory and for users spread over many OUs.  Leave
# bind_dn_template out then.  The password comes from a root-only file
# (root:root 0600), never from this file or the repository.
# from pathlib import Path
# c.LDAPAuthenticator.lookup_dn = True
# c.LDAPAuthenticator.user_search_base = "ou=people,dc=example,dc=org"
# c.LDAPAuthenticator.user_attribute = "uid"                   # AD: "sAMAccountName"
# c.LDAPAuthenticator.lookup_dn_user_dn_attribute = "uid"      # AD: "sAMAccountName"
# c.LDAPAuthenticator.lookup_dn_search_user = "cn=lxcgpu-reader,ou=services,dc=example,dc=org"
# c.LDAPAuthenticator.lookup_dn_search_password = (
#     Path("/etc/lxcgpu/ldap-search-password").read_text().strip()
# )
# Active Directory only: follow nested groups, and accept capitals in names.
# c.LDAPAuthenticator.lookup_dn_search_filter = (
#     "(&(objectCategory=person)(objectClass=user)({login_attr}={login}))"
# )
# c.LDAPAuthenticator.group_search_filter = "(member:1.2.840.113556.1.4.1941:={userdn})"
# c.LDAPAuthenticator.valid_username_regex = r"^[A-Za-z][.A-Za-z0-9_-]*$"

# --- who may log in, and who is an admin -------------------------------------
# Full DNs.  Members of any allowed group may log in.  Members of an admin
# group may log in too and are JupyterHub admins; whoever leaves the admin
# group loses admin rights at their next login.
c.LDAPAuthenticator.allowed_groups = ["cn=gpu-users,ou=groups,dc=example,dc=org"]
c.LXCGPUAuthenticator.admin_groups = ["cn=gpu-admins,ou=groups,dc=example,dc=org"]

# --- the GPU servers ---------------------------------------------------------
# They are listed once, for every part of lxcgpu, in the lxcgpu site file
# (/etc/lxcgpu/lxcgpu.toml, [servers.<name>] tables; docs/admin.md section 6),
# not here.  The hub reads that file from:
# c.LXCSpawner.lxcgpu_config = "/etc/lxcgpu/lxcgpu.toml"

# --- idle Jupyter servers ---------------------------------------------------
# Stop a Jupyter server after this many seconds without activity (its container,
# and any jobs running in it over SSH, keep running).  0: never.
c.LXCGPUCuller.timeout = 3600

# --- addresses, origins, HTTPS ------------------------------------------------
# The hub's host; every user's servers live on <user>.<that host>, their own
# origin.  Needs wildcard DNS (hub and *.hub -> this machine) and a wildcard
# certificate (docs/admin.md, section 10).  Default: lxcgpu.localhost on the
# bind port (this machine, or an SSH tunnel).  "" puts every server on the
# hub's origin: only where all users trust each other.
# c.JupyterHub.subdomain_host = "https://hub.example.org"
# Browsers connect here, always over HTTPS beyond loopback.  Default: port
# 8000 on every address.
# c.JupyterHub.bind_url = "https://:443"
# The certificate (with its chain) and key for the hub's host and *.<host>.
# Without them one is generated (CA in /var/lib/lxcgpu/tls/ca.crt).
# c.JupyterHub.ssl_cert = "/etc/letsencrypt/live/hub.example.org/fullchain.pem"
# c.JupyterHub.ssl_key = "/etc/letsencrypt/live/hub.example.org/privkey.pem"
# The hub API listens on the LXD bridge's address by default (containers on this
# machine reach it there).  With GPU servers on other machines, give an address
# their containers can reach, and firewall it to them:
# c.JupyterHub.hub_bind_url = "http://10.0.0.5:8081"
# c.JupyterHub.hub_connect_url = "http://10.0.0.5:8081"
