"""TEST DOUBLE for the few parts of a running 3D Slicer application that PyPI's slicer-core lacks.

Stand-ins, and nothing else:
  * ``qt`` and ``ctk``: empty modules. The Slicer module imports them at the top (its Widget
    uses them); the Logic and the tests never touch Qt.
  * ``slicer.app``: only ``slicerUserSettingsFilePath``, which the Logic reads for its default
    store folder.
  * ``slicer.ScriptedLoadableModule``: the four base classes, reduced to what the module's
    classes call (``__init__``; ``delayDisplay`` for tests).
  * ``slicer.mrmlScene``: a *real* ``vtkMRMLScene`` (in the application it is created at start-up).
  * :class:`SegmentEditorWidget`: the calls the panel makes of ``slicer.qMRMLSegmentEditorWidget`` (Qt), on
    a *real* ``vtkMRMLSegmentEditorNode`` and a *real* ``vtkSegmentationHistory``.

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


class SegmentEditorWidget:
    """TEST DOUBLE of ``slicer.qMRMLSegmentEditorWidget`` (Qt): the calls the panel makes. As the widget does
    (Slicer v5.8.1 ``Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx``, l.1919-1938,
    1984-2016, 2099-2106), selections go to its ``vtkMRMLSegmentEditorNode`` and a source volume is refused
    (``refused`` counts it; the widget logs a qCritical) while no segmentation is selected. Undo states are
    those of a real ``vtkSegmentationHistory`` on the selected segmentation, as the widget keeps them."""

    def __init__(self, node) -> None:
        self.node, self.refused = node, 0
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetMaximumNumberOfStates(10)

    def segmentationNode(self):
        return self.node.GetSegmentationNode()

    def sourceVolumeNode(self):
        return self.node.GetSourceVolumeNode()

    def setSegmentationNode(self, segmentation) -> None:
        if self.node.GetSegmentationNode() is not segmentation:
            self.node.SetAndObserveSegmentationNode(segmentation)
            self.history.SetSegmentation(segmentation.GetSegmentation() if segmentation is not None else None)

    def setSourceVolumeNode(self, volume) -> None:
        if self.node.GetSegmentationNode() is None:
            self.refused += volume is not None  # "failed: need to set segment editor and segmentation nodes first"
        elif self.node.GetSourceVolumeNode() is not volume:
            self.node.SetAndObserveSourceVolumeNode(volume)

    def setCurrentSegmentID(self, segment_id: str) -> None:
        self.node.SetSelectedSegmentID(segment_id)

    def saveStateForUndo(self) -> None:
        self.history.SaveState()

    def undo(self) -> None:
        self.history.RestorePreviousState()


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
