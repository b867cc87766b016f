"""The engine's Python packages inside 3D Slicer: which are missing, and installing them on request.

Slicer ships neither PyTorch nor MONAI. The Slicer module loads without them and installs them
on first use, only after asking. This file imports neither torch nor Slicer: the Slicer module
passes in its installers (``slicer.util.pip_install``, the PyTorch extension's ``installTorch``).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Optional

from OAIMSSegment.errors import OAIMSError

#: Python modules the engine needs that Slicer does not ship (import name -> pip name).
ENGINE_MODULES: dict[str, str] = {"torch": "torch", "monai": "monai", "scipy": "scipy", "filelock": "filelock"}


class MissingDependenciesError(OAIMSError):
    """torch / MONAI (or another engine package) is not installed and was not installed."""


def missing_dependencies() -> list[str]:
    """Pip names of engine packages that cannot be imported (empty when all are there)."""
    return [pip_name for module, pip_name in ENGINE_MODULES.items() if importlib.util.find_spec(module) is None]


def install_dependencies(
    requirements: str,
    pip_install: Callable[[list[str]], object],
    install_torch: Optional[Callable[[], object]],
    missing: Callable[[], list[str]] = missing_dependencies,
) -> None:
    """Install PyTorch with ``install_torch()`` when given and torch is missing (PyTorch Utils picks
    the right CUDA/CPU build; it returns None on failure), then the rest with
    ``pip_install(["-r", requirements])``. Raises :class:`MissingDependenciesError` with the reason
    and how to install by hand; ``missing()`` says what is still missing afterwards."""
    try:
        if install_torch is not None and importlib.util.find_spec("torch") is None and install_torch() is None:
            raise MissingDependenciesError("PyTorch Utils could not install PyTorch")
        pip_install(["-r", requirements])
    except MissingDependenciesError:
        raise
    except Exception as error:  # pip and PyTorch Utils raise many kinds
        raise MissingDependenciesError(
            f"installing {', '.join(missing()) or 'the engine packages'} failed: {error}. "
            f"Check the network connection, or install them from Slicer's Python console with "
            f"slicer.util.pip_install(['-r', r'{requirements}'])"
        ) from error
    importlib.invalidate_caches()
    still = missing()
    if still:
        raise MissingDependenciesError(f"still missing after installation: {', '.join(still)}; restart Slicer and try again")


def ensure_dependencies(
    missing: list[str], confirm: Optional[Callable[[str], bool]], install: Callable[[], None]
) -> None:
    """Nothing when ``missing`` is empty; else ``install()`` if ``confirm(message)`` agrees, or
    raise :class:`MissingDependenciesError` (never installs without consent)."""
    if not missing:
        return
    message = (
        f"OAIMS Segment needs these Python packages: {', '.join(missing)}. "
        "Install them now? This needs a network connection and may take several minutes."
    )
    if confirm is None or not confirm(message):
        raise MissingDependenciesError(f"missing Python packages: {', '.join(missing)} (not installed)")
    install()
