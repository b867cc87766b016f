"""The torch device the engine computes on: the CPU by default, CUDA or Apple's MPS when the installed
PyTorch has them and they are asked for (``"auto"`` picks CUDA, then MPS, then the CPU).

The device is the model's: :class:`~OAIMSSegment.model.ClickSegmenter` puts each image and its
guidance maps on the device of its weights, and results come back to the CPU as numpy arrays.
"""

from __future__ import annotations

import torch

from OAIMSSegment.errors import DeviceError

#: What a caller may ask for.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """The devices the installed PyTorch can compute on here, CPU first."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(name: str = "cpu") -> torch.device:
    """The device for ``name`` (one of :data:`DEVICE_CHOICES`, case-insensitive; ``"cuda:1"`` names a GPU).

    Raises:
        DeviceError: an unknown name, or a device this PyTorch build or machine lacks (with what is available).
    """
    choice = str(name).strip().lower()
    kind = choice.split(":", 1)[0]
    if kind not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    available = available_devices()
    if kind == "auto":
        return torch.device(next(d for d in ("cuda", "mps", "cpu") if d in available))
    if kind not in available:
        why = {"cuda": "this PyTorch build has no CUDA support or no NVIDIA GPU is visible (torch.cuda.is_available() is False)",
               "mps": "this PyTorch build or machine has no Apple MPS support (torch.backends.mps.is_available() is False)"}[kind]
        raise DeviceError(f"device {name!r} is not available: {why}; available: {', '.join(available)}. "
                          "Install the matching PyTorch build with the PyTorch Utils module, or use 'auto' or 'cpu'")
    if kind == "cuda" and ":" in choice:
        index = choice.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(choice)
