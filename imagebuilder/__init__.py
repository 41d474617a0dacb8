"""lxcgpu-image: builds the template image users' containers start from.

It runs on a build machine as root (debootstrap) and talks to LXD only
through the ``lxc`` client to import the result; nothing in the hub, the
spawner or the node agent imports it.  See docs/image.md.
"""
