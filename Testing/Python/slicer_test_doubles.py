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
  * :func:`qt_widgets` (only for the test that builds the Widget): ``qt`` classes whose objects hold their
    properties as attributes, check each connected signal against the Qt class's own (:data:`QT_SIGNALS`) and
    deliver it as PythonQt does; a ``QUiLoader`` that builds them from the real ``.ui`` file (so the *real*
    ``slicer.util.loadUI``, ``childWidgetVariables`` and ``findChildren`` run on them); ``slicer.app`` with a
    main window, ``processEvents`` and testing mode; ``slicer.qMRMLSegmentEditorWidget`` (the double above).

MRML, VTK and ``slicer.util`` are the real slicer-core ones: never fake them here.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import unittest
import xml.etree.ElementTree as ET

import slicer


class ScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent

    def setup(self) -> None:  # Slicer's adds the Reload & Test section and sets ``layout`` to the panel's
        self.layout = sys.modules["qt"].QVBoxLayout()

    def resourcePath(self, filename: str) -> str:  # Slicer's: ``<module folder>/Resources/<filename>``
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)


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

    def __init__(self, node=None) -> None:
        self.node, self.refused, self.undoEnabled = node, 0, True
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetMaximumNumberOfStates(10)

    enabled = True

    def blockSignals(self, block: bool) -> bool:  # a QWidget's: it has no signal the panel connects
        return False

    def setMRMLSegmentEditorNode(self, node) -> None:
        self.node = node

    def setMaximumNumberOfUndoStates(self, count: int) -> None:
        self.history.SetMaximumNumberOfStates(count)

    def setUndoEnabled(self, enabled: bool) -> None:
        self.undoEnabled = enabled

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

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


#: Signals of the Qt classes the Widget connects (Qt 5 docs), inherited ones included.
_BUTTON = {"clicked()", "clicked(bool)", "toggled(bool)", "pressed()", "released()"}
QT_SIGNALS = {
    "QComboBox": {"activated(int)", "currentIndexChanged(int)", "currentTextChanged(QString)", "editTextChanged(QString)"},
    "QLineEdit": {"editingFinished()", "returnPressed()", "textChanged(QString)", "textEdited(QString)"},
    "QPushButton": _BUTTON, "QCheckBox": _BUTTON | {"stateChanged(int)"}, "QToolButton": _BUTTON,
    "QSpinBox": {"valueChanged(int)", "editingFinished()"}, "QDoubleSpinBox": {"valueChanged(double)", "editingFinished()"},
    "QShortcut": {"activated()", "activatedAmbiguously()"}, "QTimer": {"timeout()"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
}

#: Methods the doubles accept and record in ``calls`` (the Qt and Slicer widget methods the Widget calls).
_RECORDED = {"setMRMLScene", "setCurrentNode", "setPlaceModeEnabled", "addRow", "addWidget", "setParent", "deleteLater", "start", "stop"}


def _pythonqt_arguments(slot, args: tuple) -> tuple:
    """What PythonQt passes a slot: a Python function or method without ``*args`` gets only as many arguments as it
    declares (commontk/PythonQt ``src/PythonQtSignalReceiver.cpp``, ``PythonQtSignalTarget::call``); others get all."""
    function = getattr(slot, "__func__", slot)
    code = getattr(function, "__code__", None)
    if code is None or code.co_flags & inspect.CO_VARARGS:
        return args
    return args[: code.co_argcount - (1 if inspect.ismethod(slot) else 0)]


class QtObject:
    """TEST DOUBLE of a PythonQt-wrapped widget: properties are attributes, ``connect`` refuses a signal its class
    lacks, ``emit`` delivers one as PythonQt does (unless ``blockSignals``), combo boxes keep ``items``."""

    def __init__(self, class_name: str = "QWidget", name: str = "", **properties) -> None:
        self._class, self.name, self.objectName = class_name, name, name
        self._children, self._slots, self._blocked, self.calls = [], {}, False, []
        self.enabled, self.visible, self.items, self.currentText = True, True, [], ""
        if class_name == "QComboBox":
            self._children.append(QtObject("QLineEdit"))
        if class_name == "ctkPathLineEdit":  # CTK ctkPathLineEdit.cpp l.332-367: a browse QToolButton, a QComboBox with its line edit
            self._children += [QtObject("QComboBox"), QtObject("QToolButton")]
        self.__dict__.update(properties)

    def __getattr__(self, name: str):
        if name not in _RECORDED:
            raise AttributeError(f"{self._class} double has no {name}")
        return lambda *args: self.calls.append((name, *args))

    def className(self) -> str:
        return self._class

    def children(self) -> list:
        return list(self._children)

    def layout(self) -> "QtObject":
        return self.__dict__.setdefault("_layout", QtObject("QFormLayout"))

    def lineEdit(self) -> "QtObject":
        return self._children[0]

    def connect(self, signal: str, slot) -> None:
        if signal not in QT_SIGNALS.get(self._class, set()):
            raise AttributeError(f"{self._class} has no signal {signal}")
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        for slot in [] if self._blocked else self._slots.get(signal, []):
            slot(*_pythonqt_arguments(slot, args))

    def blockSignals(self, block: bool) -> bool:
        was, self._blocked = self._blocked, bool(block)
        return was

    def clear(self) -> None:
        self.items, self.currentText = [], ""

    def addItem(self, text: str, data=None) -> None:
        self.items.append((text, data))
        self.currentText = self.currentText or text  # the first item becomes current


def _ui_value(element):
    kind = element[0]
    return {"bool": lambda t: t == "true", "number": int, "double": float}.get(kind.tag, str)(kind.text or "")


def _build(element, parent: QtObject) -> None:
    for child in element:
        if child.tag == "widget":
            properties = {p.get("name"): _ui_value(p) for p in child.findall("property") if len(p)}
            widget = QtObject(child.get("class"), child.get("name"), **properties)
            parent._children.append(widget)
            _build(child, widget)
        elif child.tag in ("layout", "item"):
            _build(child, parent)


def qt_widgets(store: dict) -> dict:
    """``{module: {name: value}}`` to set on the ``qt`` and ``slicer`` modules for the Widget test; ``store`` holds
    what ``QSettings`` remembers. See the module docstring."""

    class QFile:
        ReadOnly = 1

        def __init__(self, path: str) -> None:
            self.path = path

        def exists(self) -> bool:
            return os.path.isfile(self.path)

        def open(self, mode: int) -> bool:
            return True

    class QUiLoader:
        def load(self, qfile: QFile) -> QtObject:
            root = ET.parse(qfile.path).getroot().find("widget")
            widget = QtObject(root.get("class"), root.get("name"))
            _build(root, widget)
            return widget

    class QSettings:
        def value(self, key: str):
            return store.get(key)

        def setValue(self, key: str, value) -> None:
            store[key] = value

    main = QtObject("qSlicerMainWindow", "qSlicerMainWindow")
    qt = {"QFile": QFile, "QUiLoader": QUiLoader, "QSettings": QSettings, "QVBoxLayout": lambda: QtObject("QVBoxLayout"),
          "QPushButton": lambda text="": QtObject("QPushButton", text=text), "QTimer": lambda: QtObject("QTimer"),
          "QShortcut": lambda keys, parent: QtObject("QShortcut", key=keys, parent=parent), "QKeySequence": str,
          "QEventLoop": types.SimpleNamespace(ExcludeUserInputEvents=1),
          "QApplication": types.SimpleNamespace(setOverrideCursor=lambda cursor: None, restoreOverrideCursor=lambda: None),
          "Qt": types.SimpleNamespace(WaitCursor=3), "QComboBox": types.SimpleNamespace(NoInsert=0),
          "QMessageBox": types.SimpleNamespace(Ok=1024, Cancel=4194304, Yes=16384, No=65536, Question=4, Warning=2)}
    app = types.SimpleNamespace(slicerUserSettingsFilePath=slicer.app.slicerUserSettingsFilePath, applicationName="Slicer",
                                topLevelWidgets=lambda: [main], processEvents=lambda *flags: None, testingEnabled=lambda: True,
                                restart=lambda: None)
    return {"qt": qt, "slicer": {"app": app, "qMRMLSegmentEditorWidget": SegmentEditorWidget,
                                 "qSlicerMarkupsPlaceWidget": types.SimpleNamespace(ForcePlaceMultipleMarkups=2)}}
