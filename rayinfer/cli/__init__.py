"""The command line (``rayinfer``): a thin Click layer over ``rayinfer.api``.

Nothing here imports torch, transformers or ray at module level: ``rayinfer --help`` and
``rayinfer tasks`` stay fast.
"""

from rayinfer.cli.commands import main

__all__ = ["main"]
