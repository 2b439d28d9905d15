"""Alias of `layerfusion.files` (temporary names and the leftovers of killed processes)."""

from layerfusion.files import owner_tag, pid_alive, remove_dead_leftovers

__all__ = ["owner_tag", "pid_alive", "remove_dead_leftovers"]
