"""Run the frozen layers below the adaptor once per batch, then replay their output on every training step.

Everything below the lowest LEMoE layer is frozen and does not depend on the experts, so recomputing it on each of
an edit's optimisation steps is wasted work. :class:`LowerLayerReplay` records the output of the decoder layer just
below the adaptor during one full forward pass and, while replaying, swaps the lower decoder layers for stubs that
return that output. Nothing but the layer list of the model is touched, and only inside the context manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def _rows(output: Any, rows: slice) -> Any:
    """``rows`` of every batch-first tensor in a recorded layer output (a tensor or a tuple of them)."""
    if isinstance(output, torch.Tensor):
        return output[rows]
    if isinstance(output, tuple | list):
        return type(output)(_rows(item, rows) for item in output)
    return output


class _Replayed(nn.Module):
    """Stands in for a decoder layer and returns a recorded output."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def find_layer_list(model: nn.Module, module_name: str) -> tuple[nn.ModuleList, int] | None:
    """The outermost ``nn.ModuleList`` on the path to ``module_name`` and the index of the entry holding it."""
    parts = module_name.split(".")
    for i in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:i]))
        if isinstance(parent, nn.ModuleList) and parts[i].isdigit():
            return parent, int(parts[i])
    return None


class LowerLayerReplay:
    """Records and replays the output of the decoder layers below the lowest of ``module_names``."""

    def __init__(self, model: nn.Module, module_names: list[str]) -> None:
        found = [find_layer_list(model, name) for name in module_names]
        self.layers: nn.ModuleList | None = None
        self.depth = 0
        if found and all(f is not None for f in found) and len({id(f[0]) for f in found}) == 1:
            self.layers = found[0][0]
            self.depth = min(index for _, index in found)
        self._recorded: Any = None

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """A full forward pass inside this context records the output of the layer below the adaptor."""
        self._recorded = None
        if self.layers is None or self.depth == 0:
            yield
            return

        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self._recorded = output

        handle = self.layers[self.depth - 1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replay(self, rows: slice = slice(None)) -> Iterator[None]:
        """Forward passes inside this context skip the lower layers and reuse the recorded output (of the prompts
        ``rows`` of the recorded batch)."""
        if self._recorded is None:
            yield
            return
        originals = [self.layers[i] for i in range(self.depth)]
        stub = _Replayed(_rows(self._recorded, rows))
        try:
            for i in range(self.depth):
                self.layers[i] = stub
            yield
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
