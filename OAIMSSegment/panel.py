"""The Slicer panel without Qt: what each signal does, and what the widgets show (issue 18 item 7).

The Widget in ``OAIMSSegment.py`` only builds the UI and the embedded Segment Editor, connects each
row of :data:`SIGNALS` to a :class:`Panel` method, makes each key of ``module_state.SHORTCUTS`` call
:meth:`Panel.act`, and writes :meth:`Panel.changes` back to the widgets. Every decision is here or in
:class:`~OAIMSSegment.module_state.PanelController`: the model list and what a model change shows, the
site list, what is enabled, the status line, install polling, the accept warning, *New segmentation*,
which point list a placed point belongs to. Qt is reached only through :class:`Gui`, the handful of
calls the Widget passes in (dialogs, place mode, a timer). Tested on real MRML (slicer-core) in
``Testing/Python/test_slicer_widget.py``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from OAIMSSegment import mrml
from OAIMSSegment.errors import OAIMSError
from OAIMSSegment.module_state import (CONTROLS, INSTALL_ENTRY, EditorUndo, Marker, PanelController, foreground_classes,
                                       model_entries, segment_name, site_text)

__all__ = ["Panel", "Gui", "ClickPoints", "Read", "SIGNAL_ARG", "SIGNALS", "slot_arguments", "DISCARD_QUESTION",
           "RESET_QUESTION", "ARCHIVE_FILTER"]

_LOG = logging.getLogger(__name__)

#: Asked by Discard (Yes also puts the slices back as they were before their first click).
DISCARD_QUESTION = "Discard this segment's model updates. Also erase what the clicks drew on its slices?"

#: Asked by *Reset to pretrained*.
RESET_QUESTION = "Reset this site to the pretrained model? Saved versions are kept."

#: File filter of the site model's *Export* / *Import* dialogs.
ARCHIVE_FILTER = "OAIMS site model (*.oaims.zip)"


@dataclass(frozen=True)
class Read:
    """A slot argument read from a control when its signal fires: ``getattr(ui.<control>, <prop>)``."""

    control: str
    prop: str


class _SignalArg:
    def __repr__(self) -> str:
        return "SIGNAL_ARG"


#: A slot argument that is the signal's own (first) argument: an index, a value, a check state.
SIGNAL_ARG = _SignalArg()

_adapt = tuple((box, signal, "adapt", (key, SIGNAL_ARG)) for box, signal, key in (
    ("miCheckBox", "toggled(bool)", "mi"), ("piCheckBox", "toggled(bool)", "pi"),
    ("clickLabelCheckBox", "toggled(bool)", "clickLabel"), ("stage2LocalizationCheckBox", "toggled(bool)", "stage2Localization"),
    ("sigmaSpinBox", "valueChanged(double)", "sigma"),
    ("betaSpinBox", "valueChanged(double)", "beta"), ("lrSpinBox", "valueChanged(double)", "lr")))

#: The panel's signals: ``(control, Qt signal, Panel method, its arguments)``; an argument is :data:`SIGNAL_ARG`,
#: a :class:`Read` or a constant. Controls are names of ``Resources/UI/OAIMSSegment.ui`` plus those the Widget
#: adds: ``segmentEditorWidget``, ``newSegmentationButton``, ``siteLineEdit`` (the site box's line edit), ``storeLineEdit`` and
#: ``storeBrowseButton`` (the store ``ctkPathLineEdit``'s line edit and browse button; its own
#: ``currentPathChanged`` fires per keystroke, docs/SLICER.md). Nothing acts while typing.
SIGNALS: Tuple[Tuple[str, str, str, tuple], ...] = (
    ("modelComboBox", "currentIndexChanged(int)", "chooseModel", (SIGNAL_ARG,)),
    ("classComboBox", "currentIndexChanged(int)", "chooseClass", (SIGNAL_ARG,)),
    ("siteComboBox", "activated(int)", "commitSite", (Read("siteComboBox", "currentText"),)),
    ("siteLineEdit", "editingFinished()", "commitSite", (Read("siteComboBox", "currentText"),)),
    ("storeLineEdit", "editingFinished()", "commitStore", (Read("storeFolderPathLineEdit", "currentPath"),)),
    ("storeBrowseButton", "clicked()", "commitStore", (Read("storeFolderPathLineEdit", "currentPath"),)),
    ("newSegmentationButton", "clicked(bool)", "newSegmentation", ()),
    *_adapt,
    ("autoPropagateCheckBox", "toggled(bool)", "setAutoPropagate", (SIGNAL_ARG,)),
    ("proposalCountSpinBox", "valueChanged(int)", "setProposalCount", (SIGNAL_ARG,)),
    *((f"{name}Button", "clicked(bool)", "act", (name,)) for name in ("undo", "propagate", "accept", "discard")),
    ("proposeButton", "clicked(bool)", "propose", ()),
    ("pickProposalButton", "clicked(bool)", "pickProposal", (Read("proposalIndexSpinBox", "value"),)),
    ("resetSiteButton", "clicked(bool)", "resetSite", ()),
    ("rollbackButton", "clicked(bool)", "rollback", (Read("rollbackSpinBox", "value"),)),
    ("exportButton", "clicked(bool)", "exportSite", ()),
    ("importButton", "clicked(bool)", "importSite", ()),
)


def slot_arguments(arguments: tuple, signal_args: tuple, control: Callable[[str], Any]) -> list:
    """The values a :data:`SIGNALS` row passes its method when the signal fires with ``signal_args``;
    ``control(name)`` gives a control (the Widget's ``ui``)."""
    return [getattr(control(a.control), a.prop) if isinstance(a, Read) else signal_args[0] if a is SIGNAL_ARG else a
            for a in arguments]


@dataclass
class Gui:
    """The Qt side the panel calls (the Widget passes Slicer's; a test passes recording ones).

    Attributes:
        status: writes the status line now (also while a job runs).
        ask: an OK/Cancel question (``slicer.util.confirmOkCancelDisplay``); True for OK.
        askYesNo: a Yes/No question (``slicer.util.confirmYesNoDisplay``); True for Yes.
        warn: a warning popup (``slicer.util.warningDisplay``).
        askPath: ``(save, caption, file filter)`` -> a file path from a file dialog, "" if cancelled.
        place: ``(positive, on)``: the foreground/background place widget's place mode.
        showPoints: ``(positive, point list)``: that place widget places into this new list.
        every: ``(ms, tick)`` starts a timer calling ``tick``; returns a function that stops it.
        restart: restarts Slicer (``slicer.util.restart``).
        waitCursor: a context manager showing the wait cursor (``slicer.util.WaitCursor``).
        show: writes :meth:`Panel.changes` to the widgets (after an MRML event; a signal's slot does it itself).
    """

    status: Callable[[str], None]
    ask: Callable[[str], bool]
    askYesNo: Callable[[str], bool]
    warn: Callable[[str], None]
    askPath: Callable[[bool, str, str], str]
    place: Callable[[bool, bool], None]
    showPoints: Callable[[bool, Any], None]
    every: Callable[[int, Callable[[], None]], Callable[[], None]]
    restart: Callable[[], None]
    waitCursor: Callable[[], Any] = contextlib.nullcontext
    show: Callable[[], None] = lambda: None


class ClickPoints:
    """The foreground and background markups point lists, (re-)created when missing (first use, a new
    scene, a deleted list). A point placed in either is locked and becomes
    ``on_click(ras, positive, slice node or "Axial", marker)``; ``on_new_list(positive, node)`` is told of each list."""

    def __init__(self, scene, on_click: Callable, on_new_list: Callable[[bool, Any], None]) -> None:
        self.scene, self.on_click, self.on_new_list = scene, on_click, on_new_list
        self._lists: Dict[bool, Any] = {}
        self._stops: List[Callable[[], Any]] = []

    def ensure(self, positive: bool):
        """The point list of foreground (``positive``) or background clicks, created if it is not in the scene."""
        node = self._lists.get(positive)
        if node is None or node.GetScene() is None:
            node = self._lists[positive] = mrml.click_point_list(self.scene, positive)
            self._stops.append(mrml.observe(node, node.PointPositionDefinedEvent,
                                            lambda index, node=node: self._placed(node, index), index_data=True))
            self.on_new_list(positive, node)
        return node

    def positive(self, node) -> bool:
        """True for the foreground list (a click adds the active class), False for the background one."""
        return node is self._lists.get(True)

    def _placed(self, node, index: Optional[int]) -> None:
        index = node.GetNumberOfControlPoints() - 1 if index is None else index  # None: a batched event
        node.SetNthControlPointLocked(index, True)  # the engine used this position: it must not be dragged away
        ras, slice_node = mrml.placed_point(self.scene, node, index)
        point_id = node.GetNthControlPointID(index)
        marker = Marker(lambda: node.RemoveNthControlPoint(node.GetNthControlPointIndexByID(point_id)))
        self.on_click(ras, self.positive(node), slice_node or "Axial", marker)

    def stop(self) -> None:
        """Remove the observers (module cleanup)."""
        for stop in self._stops:
            stop()
        self._stops = []


class Panel:
    """The panel's behaviour: the Widget's signals call its methods, :meth:`changes` is what to show.

    Args:
        logic: the module's ``OAIMSSegmentLogic``.
        runner: the :class:`~OAIMSSegment.runner.JobRunner` the controller runs jobs through.
        editor: the embedded ``qMRMLSegmentEditorWidget`` (``setSegmentationNode``, ``setSourceVolumeNode``,
            ``setCurrentSegmentID``, ``sourceVolumeNode``, ``segmentationNode``, ``saveStateForUndo``, ``undo``),
            on the scene's singleton Segment Editor node.
        gui: the Qt calls (:class:`Gui`).
        scene: the MRML scene.
        settings: ``qt.QSettings()`` (``value``, ``setValue``) where committed fields are remembered.
    """

    def __init__(self, logic, runner, editor, gui: Gui, scene, settings: Any = None) -> None:
        self.logic, self.runner, self.editor, self.gui, self.scene = logic, runner, editor, gui, scene
        self.editorNode = mrml.segment_editor_node(scene)
        stamp = lambda: mrml.segment_stamp(logic.segmentationNode, logic.segmentId)  # noqa: E731
        self.controller = control = PanelController(logic, runner, EditorUndo(editor, stamp), self.report, settings)
        self.points = ClickPoints(scene, lambda *click: self._observed(lambda: control.click(*click)), gui.showPoints)
        self.models: List[Tuple[str, str]] = []  # (text, data) of the model list
        self.siteNames: List[str] = []
        self.proposalCount = 3
        self._shown: Dict[str, dict] = {}
        self._process = None  # the pip process an install runs
        self._stopPolling: Callable[[], Any] = lambda: None
        self._stops: List[Callable[[], Any]] = []
        #: What each key of ``SHORTCUTS`` and the Undo/Propagate/Accept/Discard buttons do.
        self.actions: Dict[str, Callable[[], Any]] = {
            "foreground": lambda: self.place(True), "background": lambda: self.place(False),
            "undo": control.undo, "propagate": control.propagate, "accept": self.accept, "discard": self.discard,
            "nextProposal": lambda: control.stepProposal(1, self.proposalCount),
            "previousProposal": lambda: control.stepProposal(-1, self.proposalCount),
            "pickProposal": control.pickProposal}

    # -- the module's life ---------------------------------------------------------------------
    def setup(self, site: Optional[str]) -> None:
        """List the models and sites, open the remembered ``site`` and observe the editor node and the scene."""
        self.models = model_entries(self.logic.availableModels(), self.logic.missingDependencies())
        self.siteNames = self.controller.siteChoices(site or self.controller.site.value)
        self.controller.commitSite(site or self.controller.site.value)
        self._stops = [mrml.observe(self.editorNode, "ModifiedEvent", lambda: self._observed(self.selectFromEditor)),
                       mrml.observe_scene(self.scene, lambda: self._observed(self.sceneClosing),
                                         lambda node: self._observed(lambda: self.controller.nodeRemoved(node))), self.points.stop]

    def _observed(self, action: Callable[[], Any]) -> None:
        """An MRML event's action, then the widgets are brought up to date (no Qt signal's slot does it)."""
        action()
        self.gui.show()

    def cleanup(self) -> None:
        for stop in self._stops:
            stop()
        self._stopPolling()

    def enter(self) -> None:
        """The module is shown: make the point lists; start at the volume the views show, not at None."""
        for positive in (True, False):
            self.points.ensure(positive)
        # The editor takes a source volume only once a segmentation is selected (qMRMLSegmentEditorWidget.cxx:1984-1993).
        if self.editor.segmentationNode() is not None and self.editor.sourceVolumeNode() is None:
            self.editor.setSourceVolumeNode(mrml.shown_volume(self.scene))

    def exit(self) -> None:
        """The module is left (or the scene closes): end place mode."""
        for positive in (True, False):
            self.gui.place(positive, False)

    def sceneClosing(self) -> None:
        self.exit()
        self.controller.sceneClosing()

    # -- actions -------------------------------------------------------------------------------
    def act(self, name: str) -> None:
        """A shortcut or action button: :attr:`actions` ``[name]``."""
        self.actions[name]()

    def place(self, positive: bool) -> None:
        self.points.ensure(positive)
        self.gui.place(positive, True)

    def accept(self) -> None:
        self.controller.accept()
        warning = self.controller.acceptWarning()
        if warning:
            self.gui.warn(warning)

    def discard(self) -> None:
        if self.logic.workedSlices:
            self.controller.discard(revertSlices=bool(self.gui.askYesNo(DISCARD_QUESTION)))

    def selectFromEditor(self) -> None:
        """The Segment Editor node changed: its volume, segmentation and segment take effect at once."""
        node = self.editorNode
        self.controller.selectInputs(node.GetSourceVolumeNode(), node.GetSegmentationNode(), node.GetSelectedSegmentID())

    def newSegmentation(self) -> None:
        """*New segmentation*: on the editor's volume (else the one the views show), one segment named after the model's first class."""
        volume = self.editor.sourceVolumeNode() or mrml.shown_volume(self.scene)
        if volume is None:
            return self.report("Load the volume to segment first (it is taken from the slice views), or choose it as the Source volume.")
        segmentation, segmentId = mrml.new_segmentation(self.scene, volume, segment_name(self.logic.card))
        self.editor.setSegmentationNode(segmentation)  # first: the editor takes a source volume only with a segmentation
        self.editor.setSourceVolumeNode(volume)
        self.editor.setCurrentSegmentID(segmentId)

    def chooseModel(self, index: int) -> None:
        """A pick in the model list: load the model (the segment restarts with its classes and settings), or install."""
        name = self.models[index][1] if 0 <= index < len(self.models) else ""
        if name == INSTALL_ENTRY:
            return self.install()
        if name and self.runNow(self.logic.setModel, name):
            self.controller.sceneClosing()  # the new model's classes: the segment restarts from the editor's inputs
            self.selectFromEditor()

    def chooseClass(self, index: int) -> None:
        classes = self.classes()
        if 0 <= index < len(classes):
            self.logic.setActiveClass(classes[index][1])

    def classes(self) -> List[Tuple[str, int]]:
        """``(name, index)`` of the model's foreground classes, by index (empty without a model)."""
        return foreground_classes(self.logic.card)

    def adapt(self, key: str, value) -> None:
        """An adaptation setting (``mi``, ``pi``, ``sigma``, ``beta``, ``lr``, ``clickLabel``, ``stage2Localization``) was changed."""
        self.logic.setAdaptation(**{key: value})

    def setAutoPropagate(self, on: bool) -> None:
        self.logic.autoPropagate = bool(on)

    def setProposalCount(self, k: int) -> None:
        self.proposalCount = int(k)

    def propose(self) -> None:
        self.runNow(self.logic.proposeNextSteps, self.proposalCount)

    def pickProposal(self, number: int) -> None:
        """*Use* with the proposal number box (1-based)."""
        self.controller.pickProposal(int(number) - 1)

    def commitSite(self, text: str) -> None:
        """The site box was committed. Through the runner: a focus-out (a control disabled as a job starts) waits for the job."""
        self.runner.request(lambda: self.controller.commitSite(text))

    def commitStore(self, path: str) -> None:
        def commit():
            if self.controller.commitStore(path):
                self.siteNames = self.controller.siteChoices(self.controller.site.value)
        self.runner.request(commit)

    def resetSite(self) -> None:
        if self.gui.ask(RESET_QUESTION):
            self.runNow(self.logic.resetSiteModel)

    def rollback(self, version: int) -> None:
        self.runNow(self.logic.rollbackSiteModel, int(version))

    def exportSite(self) -> None:
        self._archive(True, "Export", self.logic.exportSiteModel)

    def importSite(self) -> None:
        self._archive(False, "Import", self.logic.importSiteModel)

    def _archive(self, save: bool, verb: str, action: Callable[[str], Any]) -> None:
        path = self.gui.askPath(save, f"{verb} site model", ARCHIVE_FILTER)
        if path:
            self.runNow(action, path)

    def install(self) -> None:
        """Ask, then install the missing packages in the background, the status line following pip."""
        missing = self.logic.missingDependencies()
        if missing and self.gui.ask(f"Install {', '.join(missing)}? This needs a network connection."):
            if self.runNow(lambda: setattr(self, "_process", self.logic.installInBackground())):
                self._stopPolling = self.gui.every(200, self.pollInstall)  # pip runs in its own process: the panel stays live

    def pollInstall(self) -> None:
        if self.controller.pollInstall(self._process, self.gui.ask, self.gui.restart):
            self._stopPolling()

    def runNow(self, action: Callable, *args: Any) -> bool:
        """Run a Logic action now, on the main thread, with a wait cursor; show its error. True if it succeeded."""
        try:
            with self.gui.waitCursor():
                action(*args)
            return True
        except OAIMSError as error:
            self.report(str(error))
            return False

    def report(self, text: str) -> None:
        """The status line (and the log)."""
        self.gui.status(text)
        _LOG.info("OAIMSSegment: %s", text)

    # -- what the widgets show ---------------------------------------------------------------------
    def view(self) -> Dict[str, dict]:
        """``{control: {property: value}}`` the widgets should show now (a combo box's ``items``, ``(text, data)``
        pairs, first). While a job runs, only what is enabled and the busy bar (nothing else is read then)."""
        view: Dict[str, dict] = {"busyProgressBar": {"visible": self.runner.busy}}
        for key, on in self.controller.enabled().items():
            for name in CONTROLS.get(key, ()):
                view.setdefault(name, {})["enabled"] = on
        if self.runner.busy:
            return view
        logic, info = self.logic, self.logic.siteModelInfo()
        shown = {"modelComboBox": {"items": self.models}, "classComboBox": {"items": self.classes()},
                 "siteComboBox": {"items": [(name, name) for name in self.siteNames], "currentText": self.controller.site.value},
                 "storeFolderPathLineEdit": {"currentPath": self.controller.store.value},
                 "siteInfoLabel": {"text": site_text(info)}, "rollbackSpinBox": {"maximum": max(info["versions"] or [0])},
                 "autoPropagateCheckBox": {"checked": logic.autoPropagate}, "proposalCountSpinBox": {"value": self.proposalCount}}
        if logic.card is not None:
            settings = logic.adaptationSettings()
            for box, _, _, (key, _) in _adapt:
                shown[box] = {"checked" if box.endswith("CheckBox") else "value": settings[key]}
        for name, values in shown.items():
            view[name] = {**values, **view.get(name, {})}
        return view

    def changes(self) -> Dict[str, dict]:
        """What changed in :meth:`view` since the last call, per control: the properties that changed, or all of
        them when its ``items`` changed (refilling a combo box resets its text). The Widget writes these."""
        changed = {}
        for name, values in self.view().items():
            shown = self._shown.setdefault(name, {})
            new = {prop: value for prop, value in values.items() if prop not in shown or shown[prop] != value}
            if "items" in new:
                new = dict(values)
            if new:
                changed[name] = new
                shown.update(new)
        return changed
