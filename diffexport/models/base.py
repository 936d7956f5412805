"""Base class for diffexport models: remembers its constructor arguments for checkpoints.

Adoption is one line: subclass :class:`Module` instead of ``torch.nn.Module``. Every instance
then carries ``_init_args``, the keyword arguments (defaults applied, ``**kwargs`` flattened)
it was built with, which :func:`diffexport.checkpoints.save_model` writes to ``args.json`` so the
model can be rebuilt as ``cls(**_init_args)``; they must therefore be JSON-serialisable.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch

from .legacy import drop_device_buffers


class Module(torch.nn.Module):
    """``torch.nn.Module`` that records its bound constructor arguments in ``self._init_args``."""

    # Written to metadata.json; PhysicsNeMo refuses checkpoints whose version its class lacks.
    __model_checkpoint_version__ = "0.1.0"

    def __new__(cls, *args: Any, **kwargs: Any) -> Module:
        self = super().__new__(cls)
        # bind_partial: copy/deepcopy/pickle call ``cls.__new__(cls)`` without arguments.
        bound = inspect.signature(cls.__init__).bind_partial(self, *args, **kwargs)
        bound.apply_defaults()
        init_args: dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:  # [0] is self
            kind = bound.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                init_args.update(value)
            elif kind is not inspect.Parameter.VAR_POSITIONAL:  # *args cannot be rebuilt by name
                init_args[name] = value
        object.__setattr__(self, "_init_args", init_args)  # before nn.Module.__init__ runs
        return self

    def __init__(self) -> None:
        super().__init__()
        # PhysicsNeMo 1.x checkpoints carry an empty ``device_buffer``: accepted by strict loads too
        self.register_load_state_dict_pre_hook(_drop_device_buffers)

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for a model without any)."""
        tensors = itertools.chain(self.parameters(), self.buffers())
        return next(tensors, torch.empty(0)).device


def _drop_device_buffers(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
    drop_device_buffers(state_dict, prefix)
