"""When one forward pass may stand in for another (issue 21: MI and PI without repeated passes).

The session shows predictions computed in eval mode without gradients and adapts on predictions
computed in train mode with gradients. Reusing one for the other, or keeping a prediction's
autograd graph until the next click's MI step, is only correct when it is provably the same
computation: the same network behaviour in both modes (:func:`train_equals_eval`), the same
weights (:func:`weights_version`), the same image and clicks (the session's key).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from monai.networks.blocks import ADN, Convolution, ResidualUnit
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

T = TypeVar("T")

#: Layers whose forward does not read ``self.training``.
_MODE_FREE_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.PReLU, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity,
    nn.GroupNorm, nn.LayerNorm,
)
#: Containers whose forward only chains their children (MONAI's, read in monai/networks: none
#: of them branches on ``self.training``).
_MODE_FREE_CONTAINERS = (nn.Sequential, UNet, Convolution, ResidualUnit, ADN, SkipConnection)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_INSTANCE_NORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _mode_free(module: nn.Module) -> bool:
    if isinstance(module, _INSTANCE_NORM):  # per-image statistics in both modes unless it tracks running ones
        return not module.track_running_stats
    if isinstance(module, _DROPOUT):  # p = 0 returns its input in train mode too (no random numbers drawn)
        return module.p == 0.0
    return isinstance(module, _MODE_FREE_LAYERS + _MODE_FREE_CONTAINERS)


def train_equals_eval(network: nn.Module) -> bool:
    """True when every module below ``network`` (the network itself excluded: the caller's
    wrapper, e.g. :class:`~OAIMSSegment.model.ClickSegmenter`, only calls its child) is of a
    kind known to compute the same in train and eval mode: no batch norm, no dropout with
    p > 0, no instance norm with running statistics. Anything unknown answers False, so a
    network nobody has checked is never reused."""
    return all(_mode_free(module) for _, module in network.named_modules() if module is not network)


def weights_version(*modules: nn.Module) -> tuple[int, ...]:
    """The in-place version counters of every parameter and buffer of ``modules``.

    An optimizer step and ``load_state_dict`` write into these tensors in place, which bumps
    their counters: two equal versions mean no weight changed in between (autograd checks the
    same counters before it back-propagates through a saved graph)."""
    return tuple(tensor._version for module in modules for tensor in module.state_dict(keep_vars=True).values())


def saved_tensor_bytes(function: Callable[[], T], exclude: nn.Module | None = None) -> tuple[T, int]:
    """``function()`` and the bytes autograd saved for its backward pass: the memory that
    keeping its graph holds. Storages are counted once; those of ``exclude``'s parameters (the
    weights, which exist anyway) are not counted."""
    seen = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return result, total
