"""The engine I/O contract: what an engine takes and returns (plain dataclasses, no pydantic, so
loading and running an engine does not import the recipe schema)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output; ``shape[0] == -1`` is the dynamic batch. ``grid`` (kind
    ``global_index`` only): the global (H, W) its row/column values index."""

    name: str
    shape: list[int]
    dtype: str = "float32"
    kind: str = "tensor"  # x | sigma | vector | image | index | global_index | denoised
    grid: list[int] | None = None

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
        return cls([TensorSpec(**s) for s in d["inputs"]], [TensorSpec(**s) for s in d["outputs"]], dict(d.get("batch", {})))


def global_index_spec(h: int, w: int, grid: tuple[int, int]) -> TensorSpec:
    """The ``global_index`` input: int64 [B, 2, h, w], global (row, column) of each patch pixel in ``grid``."""
    return TensorSpec("global_index", [-1, 2, h, w], "int64", "global_index", grid=list(grid))
