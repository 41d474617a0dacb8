"""lxcspawner: the core of lxcgpu.

Async access to LXD, container naming, creation from the template image,
provisioning inside containers, the store, port maps and DNAT rules, and the
JupyterHub ``LXCSpawner``.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # The spawner imports JupyterHub: load it only when asked for (the node
    # agent and the admin command never need it).
    if name == "LXCSpawner":
        from .spawner import LXCSpawner
        return LXCSpawner
    raise AttributeError(name)
