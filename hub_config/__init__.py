"""lxcgpu's JupyterHub configuration and the small classes it wires in.

``jupyterhub_config.py`` is the configuration file itself (``jupyterhub -f``);
the modules beside it are imported by it: the LDAP authenticator with an admin
group (:mod:`hub_config.authenticator`), the idle culler service
(:mod:`hub_config.culler`), the hub's state directory and its secrets
(:mod:`hub_config.statedir`) and the LXD bridge address (:mod:`hub_config.bridge`).
"""
