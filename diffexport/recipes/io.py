"""The engine I/O contract: what an engine takes and returns (plain dataclasses, no pydantic, so
loading and running an engine does not import the recipe schema)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output; ``shape[0] == -1`` is the dynamic batch. ``grid`` (kind
    ``global_index`` only): the global (H, W) its row/column values index. ``high`` (kind ``index``
    only): the exclusive upper bound of its values, which lie in ``[0, high)``."""

    name: str
    shape: list[int]
    dtype: str = "float32"
    kind: str = "tensor"  # x | sigma | vector | image | index | global_index | denoised
    grid: list[int] | None = None
    high: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class IOSpec:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs], "batch": self.batch}

    @classmethod
    def from_dict(cls, d: dict) -> IOSpec:
        """The contract of ``d`` (``to_dict``'s form); ``ValueError`` naming the entry that is not one."""
        if not isinstance(d, dict) or not isinstance(d.get("inputs"), list) or not isinstance(d.get("outputs"), list):
            raise ValueError("io must be an object with lists 'inputs' and 'outputs'")
        return cls([_spec(s, f"io.inputs[{i}]") for i, s in enumerate(d["inputs"])],
                   [_spec(s, f"io.outputs[{i}]") for i, s in enumerate(d["outputs"])], dict(d.get("batch", {})))


def _spec(entry: object, where: str) -> TensorSpec:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    known = {f.name for f in fields(TensorSpec)}
    if unknown := sorted(map(str, set(entry) - known)):
        raise ValueError(f"{where} has unknown keys {unknown} (expected {sorted(known)})")
    if missing := sorted({"name", "shape"} - set(entry)):
        raise ValueError(f"{where} lacks {missing}")
    if "high" in entry and (not isinstance(entry["high"], int) or isinstance(entry["high"], bool) or entry["high"] < 1):
        raise ValueError(f"{where}.high must be an integer >= 1, got {entry['high']!r}")
    return TensorSpec(**entry)


def global_index_spec(h: int, w: int, grid: tuple[int, int]) -> TensorSpec:
    """The ``global_index`` input: int64 [B, 2, h, w], global (row, column) of each patch pixel in ``grid``."""
    return TensorSpec("global_index", [-1, 2, h, w], "int64", "global_index", grid=list(grid))
