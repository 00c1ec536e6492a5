"""Options that several commands share."""

from __future__ import annotations

import click

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a spec key, e.g. --set runtime.batch_size=32 (repeatable).",
)


def _default_address() -> str:
    import os

    return os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"


address_option = click.option(
    "--address",
    default=_default_address,
    show_default="$RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or http://127.0.0.1:8265",
    help="The cluster's job server (dashboard) address.",
)
