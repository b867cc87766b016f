"""TEST DOUBLE for the few parts of a running 3D Slicer application that PyPI's slicer-core lacks.

Stand-ins, and nothing else:
  * ``qt`` and ``ctk``: empty modules. The Slicer module imports them at the top (its Widget
    uses them); the Logic and the tests never touch Qt.
  * ``slicer.app``: only ``slicerUserSettingsFilePath``, which the Logic reads for its default
    store folder.
  * ``slicer.ScriptedLoadableModule``: the four base classes, reduced to what the module's
    classes call (``__init__``; ``delayDisplay`` for tests).
  * ``slicer.mrmlScene``: a *real* ``vtkMRMLScene`` (in the application it is created at start-up).

MRML, VTK and ``slicer.util`` are the real slicer-core ones: never fake them here.
"""

from __future__ import annotations

import os
import sys
import types
import unittest

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.parent = parent


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        print(message)


def install(settings_dir: str) -> None:
    """Register the stand-ins (idempotent); ``settings_dir`` plays Slicer's user settings folder."""
    for name in ("qt", "ctk"):
        sys.modules.setdefault(name, types.ModuleType(name))
    base = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest):
        setattr(base, cls.__name__, cls)
    sys.modules["slicer.ScriptedLoadableModule"] = base
    slicer.ScriptedLoadableModule = base
    slicer.app = types.SimpleNamespace(slicerUserSettingsFilePath=os.path.join(settings_dir, "Slicer.ini"))
    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()
