"""Hook specifications: the contract between rayinfer and its plugins."""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("rayinfer")
hookimpl = pluggy.HookimplMarker("rayinfer")


@hookspec
def register_tasks(register: Callable[[type], None]) -> None:
    """Register task classes by calling ``register(TaskClass)`` once per task."""
