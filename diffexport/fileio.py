"""Atomic file writes, shared by every layer (nothing here imports the rest of diffexport)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename; a reader
    never sees a half-written file. Mode 0644 (mkstemp's 0600 would hide it from Triton, CI...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def unwritable(folder: str | Path) -> str | None:
    """Why files cannot be created in ``folder`` (when it does not exist yet: in the nearest existing
    folder above it, where it would be created), or None when they can. Found out by creating and
    removing a temporary file there: permission bits do not stop root, a read-only mount or /proc does."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffexport-probe.", dir=existing)
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror or type(e).__name__})"
    os.close(fd)
    os.unlink(probe)
    return None
