"""Undo snapshots of a session's weights and optimizer state in reused buffers (issue 21).

Before each MI step (and at an image's start, and before a PI update) the session keeps the
weights and the Adam moments, so that undo, discard and the drift guard can put them back
exactly. A deep copy of ``state_dict()`` allocates fresh memory for every tensor (18.6 MiB for
the shipped U-Nets, three tensors per parameter); the page faults of that memory and the deep
copy's bookkeeping made it cost about a forward pass per click. A :class:`StateSnapshot` copies
the same tensors into buffers kept from an earlier snapshot (``copy_``: the same values, bit for
bit), and :meth:`StateSnapshot.restore` copies them back into the model's and the optimizer's
own tensors, as ``Module.load_state_dict`` does for the weights, so the buffers stay free to be
reused. (``Optimizer.load_state_dict`` would instead adopt the snapshot's tensors as its state.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from OAIMSSegment.methods import AdaptationMethod


def _copy_into(buffer: Any, value: Any) -> Any:
    """``value`` copied into ``buffer`` when that is a tensor of its shape and dtype, else a new
    copy (a clone for a tensor; other values, e.g. a Python step count, are immutable)."""
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(buffer, torch.Tensor) and buffer.shape == value.shape and buffer.dtype == value.dtype:
        return buffer.copy_(value)
    return value.detach().clone()


def _model_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor of ``model.state_dict()`` (parameters and buffers), in its order."""
    return list(model.state_dict(keep_vars=True).values())


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class StateSnapshot:
    """The weights of a model, its optimizer's per-parameter state and a method's extra state.

    The optimizer's hyper-parameters (``param_groups``: learning rate, betas) are not part of it:
    the session fixes them from its configuration, which cannot change while an image is open.
    """

    def __init__(self) -> None:
        self._weights: list[torch.Tensor] = []
        self._optimizer: list[dict[str, Any] | None] = []
        self.extra: dict = {}

    def capture(self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> "StateSnapshot":
        """Copy the current state into this snapshot's buffers (allocated on first use); ``extra``
        (the method's :meth:`~OAIMSSegment.methods.AdaptationMethod.state_dict`, already a copy) is
        kept as it is. Returns ``self``."""
        with torch.no_grad():
            weights = _model_tensors(model)
            old = self._weights if len(self._weights) == len(weights) else [None] * len(weights)
            self._weights = [_copy_into(buffer, tensor) for buffer, tensor in zip(old, weights)]
            parameters = _parameters(optimizer)
            saved = self._optimizer if len(self._optimizer) == len(parameters) else [None] * len(parameters)
            self._optimizer = [self._capture_state(optimizer.state.get(p), buffers)
                               for p, buffers in zip(parameters, saved)]
        self.extra = extra
        return self

    @staticmethod
    def _capture_state(state: dict | None, buffers: dict | None) -> dict | None:
        if not state:  # the parameter has not been stepped yet: Adam starts its state lazily
            return None
        buffers = buffers or {}
        return {key: _copy_into(buffers.get(key), value) for key, value in state.items()}

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, method: AdaptationMethod) -> None:
        """Write the captured weights and optimizer state back (in place; the version counters of
        the weights move, as with ``load_state_dict``), and ``method``'s extra state."""
        with torch.no_grad():
            for tensor, saved in zip(_model_tensors(model), self._weights):
                tensor.copy_(saved)
            for p, saved in zip(_parameters(optimizer), self._optimizer):
                if saved is None:
                    optimizer.state.pop(p, None)
                    continue
                current = optimizer.state.get(p) or {}
                optimizer.state[p] = {key: _copy_into(current.get(key), value) for key, value in saved.items()}
        if self.extra:  # a method's load_state_dict may read the weights too: they are restored
            method.load_state_dict({"model": model.state_dict(), **self.extra})


class SnapshotPool:
    """Snapshots no longer needed, whose buffers the next :meth:`capture` reuses.

    Args:
        keep: how many to keep (an MI click, an image's start and a PI update each hold one
            while they last; 18.6 MiB each for the shipped U-Nets).
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._free: list[StateSnapshot] = []

    def capture(self, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> StateSnapshot:
        """:meth:`StateSnapshot.capture` into a free snapshot (a new one when none is free)."""
        return (self._free.pop() if self._free else StateSnapshot()).capture(model, optimizer, extra)

    def release(self, *snapshots: object) -> None:
        """These snapshots will not be restored again (anything but a :class:`StateSnapshot`,
        e.g. None or a ``state_dict``, is ignored)."""
        for snapshot in snapshots:
            if isinstance(snapshot, StateSnapshot) and len(self._free) < self.keep:
                self._free.append(snapshot)
