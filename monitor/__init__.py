"""monitor: the lxcgpu node agent and load dashboard."""
