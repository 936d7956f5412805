"""The parity verdict every consumer honours: an engine whose status is not ``ok`` is refused.

``sample``, ``bench``, ``serve``, the Triton Python models and ``engines.load`` all call
:func:`require_verified`; the C++ runner implements the same rule and message. The one opt-in is
``allow_unverified=True`` (``--allow-unverified`` on the command lines), for debugging.
"""

from __future__ import annotations

from pathlib import Path

from diffexport.engines.base import EngineError

ALLOW_FLAG = "--allow-unverified"


class UnverifiedEngine(EngineError):
    """An engine whose parity verdict is not ``ok`` (failed, unchecked, or failed for this backend)."""


def verdict(manifest: dict, backend: str | None = None) -> tuple[str, str | None]:
    """``(status, why)``: the engine's status and, when it is not usable, one phrase saying why.

    With ``backend`` (a runtime backend name such as ``onnxruntime``), an engine whose status is
    ``ok`` is still refused unless its parity summary lists that backend as passed (a backend that
    failed, or that was never checked, e.g. left out of ``diffexport parity --backend X --mark``).
    ``torch`` (the reference itself) is always verified.
    """
    status = manifest.get("status", "unchecked")
    if backend == "torch":
        return status, None
    if status != "ok":
        return status, "parity failed" if status == "failed" else "parity was not run"
    backends = (manifest.get("parity") or {}).get("backends")
    entry = backends.get(backend) if isinstance(backends, dict) and backend is not None else None
    if backend is not None and not isinstance(entry, dict):
        return "unchecked", f"parity was not run for backend {backend}"
    if entry is not None and entry.get("passed") is not True:
        return "failed", f"parity failed for backend {backend}"
    return status, None


def refusal(engine_dir: str | Path, manifest: dict, backend: str | None = None) -> str | None:
    """The one-line refusal for an unusable engine, or ``None`` when it is verified."""
    status, why = verdict(manifest, backend)
    if why is None:
        return None
    report = Path(engine_dir) / ((manifest.get("parity") or {}).get("report") or "parity.json")
    seen = f"see {report}" if report.is_file() else f"no parity report ({report.name} is missing)"
    fix = "`diffexport parity DIR --mark` verifies it" if status == "unchecked" else "rebuild or inspect it"
    return (f"engine {engine_dir} ({manifest.get('name', '?')}) is not verified: status {status}, {why}; {seen}; "
            f"{fix}, or pass {ALLOW_FLAG} to use it anyway")


def require_verified(engine_dir: str | Path, manifest: dict, backend: str | None = None, allow_unverified: bool = False) -> None:
    """Raise :class:`UnverifiedEngine` with :func:`refusal`'s line unless the engine is verified
    (or ``allow_unverified``)."""
    message = None if allow_unverified else refusal(engine_dir, manifest, backend)
    if message is not None:
        raise UnverifiedEngine(message)
