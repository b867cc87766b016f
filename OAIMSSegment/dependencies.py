"""The engine's Python packages inside 3D Slicer: which are missing, and installing them on request.

Slicer ships neither PyTorch nor MONAI. The Slicer module loads without them and installs them
on first use, only after asking. This file imports neither torch nor Slicer: the Slicer module
passes in its installers (``slicer.util.pip_install``, the PyTorch extension's ``installTorch``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, Optional

from OAIMSSegment.errors import OAIMSError

#: Python modules the engine needs that Slicer does not ship (import name -> pip name).
ENGINE_MODULES: dict[str, str] = {"torch": "torch", "monai": "monai", "scipy": "scipy", "filelock": "filelock"}


class MissingDependenciesError(OAIMSError):
    """torch / MONAI (or another engine package) is not installed and was not installed."""


def missing_dependencies() -> list[str]:
    """Pip names of engine packages that cannot be imported (empty when all are there)."""
    return [pip_name for module, pip_name in ENGINE_MODULES.items() if importlib.util.find_spec(module) is None]


#: Packages whose installed build pip must never replace: torch comes from PyTorch Utils (the build
#: for the machine's GPU/CPU), numpy is Slicer's own and already imported.
PINNED = ("torch", "numpy")

#: Where the shipped model cards are (``Resources/Models`` beside the engine package).
MODELS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Models"


def model_cards(models_dir: "str | os.PathLike" = MODELS_DIR) -> list[dict]:
    """The shipped segmentation models' cards, read from their JSON without importing torch (the panel
    lists them before torch is installed), sorted by model name as ``model.list_models``; proposal models
    (``"kind"``, or no ``labels``) are left out."""
    cards = [json.loads(path.read_text()) for path in sorted(Path(models_dir).glob("*.json"), key=lambda path: path.stem)]
    return [card for card in cards if card.get("kind", "click-segmenter" if "labels" in card else "proposals") == "click-segmenter"]


def constraints_file() -> Optional[str]:
    """A pip constraints file pinning the installed :data:`PINNED` packages (None when none is
    installed), so pip picks the MONAI release that fits the installed torch instead of replacing it."""
    pins = []
    for name in PINNED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    if not pins:
        return None
    handle, path = tempfile.mkstemp(prefix="oaims-constraints-", suffix=".txt")
    with os.fdopen(handle, "w") as stream:
        stream.write("\n".join(pins) + "\n")
    return path


class BackgroundProcess:
    """A command (e.g. ``PythonSlicer -m pip install ...``) in its own process, so the main thread and
    its GIL stay free; a reader thread collects its output lines for :meth:`poll` (MONAIAuto3DSeg's
    design, ``process.py:118-151``). ``on_exit`` runs (in :meth:`poll`) once it has finished."""

    def __init__(self, command: list[str], on_exit: Callable[[], object] = lambda: None) -> None:
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._ended, self._on_exit = False, on_exit
        threading.Thread(target=self._read, name="OAIMSSegment install output", daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip())
        self._lines.put(None)

    def poll(self) -> tuple[list[str], Optional[int]]:
        """Output lines since the last poll and the exit code (None while it runs)."""
        lines = []
        while not self._lines.empty():
            line = self._lines.get()
            if line is None:
                self._ended = True
            else:
                lines.append(line)
        if not self._ended:
            return lines, None
        code = self.process.wait()
        if self._on_exit is not None:
            self._on_exit()
            self._on_exit = None
        return lines, code


def pip_in_background(python: str, requirements: str) -> BackgroundProcess:
    """``python -m pip install -r requirements -c <pins>`` (:func:`constraints_file`) as a BackgroundProcess."""
    constraints = constraints_file()
    command = [python, "-m", "pip", "install", "-r", requirements] + (["-c", constraints] if constraints else [])
    return BackgroundProcess(command, on_exit=lambda: constraints and os.remove(constraints))


def ensure_torch(install_torch: Optional[Callable[[], object]]) -> None:
    """Install PyTorch with ``install_torch()`` (PyTorch Utils) when it is missing; never with pip."""
    if importlib.util.find_spec("torch") is not None:
        return
    if install_torch is None:
        raise MissingDependenciesError(
            "PyTorch is missing: install the PyTorch extension (Extensions Manager), which installs the "
            "build for this computer's GPU/CPU, restart Slicer and try again")
    if install_torch() is None:
        raise MissingDependenciesError("PyTorch Utils could not install PyTorch")


def install_dependencies(
    requirements: str,
    pip_install: Callable[[list[str]], object],
    install_torch: Optional[Callable[[], object]],
    missing: Callable[[], list[str]] = missing_dependencies,
) -> None:
    """Install PyTorch with ``install_torch()`` when torch is missing (PyTorch Utils picks the right
    CUDA/CPU build; it returns None on failure; pip never installs torch), then the rest with
    ``pip_install(["-r", requirements, "-c", constraints])``, the constraints pinning the installed
    torch and numpy (:func:`constraints_file`). Raises :class:`MissingDependenciesError` with the reason
    and how to install by hand; ``missing()`` says what is still missing afterwards."""
    constraints = None
    try:
        ensure_torch(install_torch)
        constraints = constraints_file()
        pip_install(["-r", requirements] + (["-c", constraints] if constraints else []))
    except MissingDependenciesError:
        raise
    except Exception as error:  # pip and PyTorch Utils raise many kinds
        raise MissingDependenciesError(
            f"installing {', '.join(missing()) or 'the engine packages'} failed: {error}. "
            f"Check the network connection, or install them from Slicer's Python console with "
            f"slicer.util.pip_install(['-r', r'{requirements}'])"
        ) from error
    finally:
        if constraints:
            os.remove(constraints)
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
