"""keyportal: the lxcgpu portal service (SSH keys, snapshots, rebuilds, forwards)."""
