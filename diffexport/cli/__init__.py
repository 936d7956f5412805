"""Command-line interface: ``diffexport build | inspect | sample | parity | bench | serve | cpp``."""

from __future__ import annotations

from .app import app, main

# Each module registers its commands on ``app`` when imported (one line per module).
from . import serve  # noqa: F401,E402
from . import cpp  # noqa: F401,E402
from . import build  # noqa: F401,E402
from . import run  # noqa: F401,E402

__all__ = ["app", "main"]
