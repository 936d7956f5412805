"""Command-line interface: ``diffexport build | inspect | sample | parity | bench | serve | cpp``."""

from __future__ import annotations

from .app import app

# Each module registers its commands on ``app`` when imported (one line per module).


def main() -> None:
    app()
