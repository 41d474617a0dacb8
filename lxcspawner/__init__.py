"""lxcspawner: the core of lxcgpu.

Async access to LXD, container naming, creation from the template image,
provisioning inside containers and, from the next milestone on, the JupyterHub
``LXCSpawner``.
"""

__version__ = "0.1.0"
