"""Packaged Hydra config tree: one folder per swappable component (config group)."""
