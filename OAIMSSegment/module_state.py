"""What the Slicer panel does, without Qt: the Widget's signals reach ``panel.Panel``, which drives a :class:`PanelController`.

The controller runs every action of the Logic through a :class:`~OAIMSSegment.runner.JobRunner`
(the model work on the worker, the main thread pumping events; actions that arrive meanwhile wait
and run in order), decides what is enabled, keeps the undo bookkeeping (markers, Segment Editor
undo states), commits the site and store fields only when the user commits them, makes a new
volume, segmentation or segment take effect at once, and reacts to the scene closing or a node
being deleted. It is tested on real MRML (``Testing/Python/test_slicer_segment.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from OAIMSSegment.errors import OAIMSError

__all__ = ["PanelController", "UndoStates", "EditorUndo", "Marker", "FieldCommit", "Job", "compute_job", "SHORTCUTS",
           "CONTROLS", "SETTINGS", "status_text", "site_text", "model_entries", "foreground_classes", "segment_name",
           "INSTALL_ENTRY", "RESTART_QUESTION"]

#: The panel's keyboard shortcuts, live while the module is shown: ``(key sequence, action, what it does)``.
#: The Widget makes each a ``qt.QShortcut`` on Slicer's main window calling ``actions[action]``. Not F/B:
#: in slice views those step to the next/previous slice (Slicer v5.8.1,
#: ``Libs/MRML/DisplayableManager/vtkMRMLSliceIntersectionWidget.cxx:173-174``), which a clinician
#: checking a propagation needs; A, X, P and N are free there (the same file, l.164-192).
SHORTCUTS = (
    ("A", "foreground", "place a foreground point (green)"),
    ("X", "background", "place a background point (red)"),
    ("P", "propagate", "propagate the open slice through the volume"),
    ("N", "nextProposal", "show the next proposal (the first press makes them)"),
    ("Shift+N", "previousProposal", "show the previous proposal"),
    ("Shift+Return", "pickProposal", "use the proposal shown as the segment"),
    ("Ctrl+Z", "undo", "undo the last click with its MI update (or the propagation or paint stroke after it)"),
    ("Ctrl+Return", "accept", "accept the segment"),
    ("Ctrl+Backspace", "discard", "discard the segment"),
)

#: The controls (names in ``Resources/UI/OAIMSSegment.ui``, or added by the Widget: the embedded Segment Editor
#: and *New segmentation*) each key of :meth:`PanelController.enabled` governs.
CONTROLS = {
    "inputs": ("segmentEditorWidget", "newSegmentationButton"),
    "place": ("foregroundPlaceWidget", "backgroundPlaceWidget"), "undo": ("undoButton",), "propagate": ("propagateButton",),
    "accept": ("acceptButton",), "proposals": ("proposeButton", "pickProposalButton"), "discard": ("discardButton",),
    "site": ("siteCollapsibleButton",), "model": ("modelComboBox", "classComboBox"),
}

#: The site used until the user picks one.
DEFAULT_SITE = "default"

#: ``QSettings`` keys of what the panel remembers.
SETTINGS = {"site": "OAIMSSegment/Site", "store": "OAIMSSegment/StoreFolder"}

#: Asked once packages are installed (TotalSegmentator's wording and flow, ``TotalSegmentator.py:329-336``).
RESTART_QUESTION = "The Python packages are installed. Slicer must restart to use them.\nPress OK to restart now."

#: The model list's entry that installs the engine's packages (its item data).
INSTALL_ENTRY = "__install__"


def model_entries(cards: List[dict], missing: List[str]) -> List[Tuple[str, str]]:
    """``(text, data)`` of the model list: a placeholder, the install entry while packages are missing, each card."""
    entries = [("(select a model)", "")]
    if missing:
        entries.append(("Install dependencies and list models...", INSTALL_ENTRY))
    return entries + [(f"{card['name']}: {card['task']}", card["name"]) for card in cards]


def foreground_classes(card) -> List[Tuple[str, int]]:
    """``(name, index)`` of a model card's foreground classes, by index (empty without a card)."""
    labels = card.labels if card is not None else {}
    return [(name, index) for name, index in sorted(labels.items(), key=lambda item: item[1]) if index]


def segment_name(card) -> str:
    """Name of the segment *New segmentation* makes: the model's first foreground class (``"Segment"`` without a model)."""
    classes = foreground_classes(card)
    return classes[0][0] if classes else "Segment"


def site_text(info: dict) -> str:
    """The site line under the site box, from the Logic's ``siteModelInfo()``."""
    images = "unknown" if info["imagesAdapted"] is None else info["imagesAdapted"]
    text = f"Site '{info['site']}': version {info['version']}, images adapted: {images}"
    return text + (f"\nNot saving: {info['problem']}" if info["problem"] else "")


@dataclass
class Job:
    """One action (``kind``: click, propagate, undo, accept or discard) in three phases: ``prepare*`` makes it
    (main thread: reads MRML, updates what is open), :func:`compute_job` runs it in the
    engine (worker: fills ``report`` and ``mask``, or ``error``), ``OAIMSSegmentLogic.apply``
    shows it (main thread: writes MRML). Every prepared job is applied, in order."""

    kind: str
    slice: Any  # the slice a click or undo acts on
    label: int = 0
    location: Any = None  # where a click is
    newImage: bool = False  # a click that makes its slice the open image (the one open stays as it is)
    edits: Any = None  # the slice's SliceEdits (click, undo)
    restoreSlice: bool = True  # an undo writes back what the slice held before the click
    finals: dict = field(default_factory=dict)  # accept: {(axis, index): class map the slice holds}
    slices: list = field(default_factory=list)  # discard: SegmentedSlices to restore
    settings: Optional[tuple] = None  # (method, AdaptConfig) taking effect when the segment opens or closes
    seeds: tuple = ()  # click on a propagated slice: the seeds it was propagated with (they join the click)
    step: Any = None  # propagate, or an undo that takes one back: its PropagationStep
    inputs: dict = field(default_factory=dict)  # propagate: SegmentWork.propagate's arguments
    refresh: list = field(default_factory=list)  # propagate after an MI step: those arguments for every other worked slice
    refreshed: list = field(default_factory=list)  # and [(origin, propagated, ends)] computed from them
    propagated: list = field(default_factory=list)  # propagate: [(index, mask, seeds)] computed
    ends: list = field(default_factory=list)  # propagate: where each direction stopped
    report: dict = field(default_factory=dict)
    mask: Optional[np.ndarray] = None  # the class map to show on the slice
    error: Optional[Exception] = None


def compute_job(work, job: Job) -> Job:
    """Worker: run ``job`` on the segment's :class:`~OAIMSSegment.segment_session.SegmentWork` (the
    engine only, no MRML). An error is kept in ``job.error`` for the Logic's ``apply`` to raise."""
    try:
        if job.kind == "click":
            if job.newImage:
                work.open((job.location.axis, job.location.index), job.slice.image, job.settings, job.slice.spacing, job.seeds)
            result, location = work.click(job.location.position, job.label), job.location
            job.mask, job.report = result.mask, {
                "latencyMs": result.latency_ms, "adaptMs": result.adapt_ms, "loss": result.loss, "label": job.label,
                "ijk": location.ijk, "pixel": location.position, "sliceAxis": "IJK"[location.axis],
                "sliceIndex": location.index, "newImage": job.newImage, "clicks": len(work.site.session.clicks),
                "foregroundPixels": int((result.mask > 0).sum())}
        elif job.kind == "propagate":
            started = time.perf_counter()
            job.propagated, job.ends = work.propagate(**job.inputs)
            job.refreshed = [(inputs["origin"], *work.propagate(**inputs)) for inputs in job.refresh]
            job.report = {"latencyMs": (time.perf_counter() - started) * 1000.0, "sliceAxis": "IJK"[job.step.axis],
                          "origin": job.inputs["origin"]}
        elif job.kind == "undo":
            if job.slice is not None:  # else the undo takes back a propagation only
                work.undo()
            job.report = {"clicks": len(work.site.session.clicks)}
        elif job.kind == "accept":
            started = time.perf_counter()
            accepted = work.accept(job.finals, job.settings, job.inputs.get("edited"))
            job.report = accepted.report((time.perf_counter() - started) * 1000.0)
        else:
            work.discard(job.settings)
            job.report = {"discarded": True}
    except Exception as error:  # raised again on the main thread by apply()
        job.error = error
    return job


def status_text(kind: str, report: dict) -> str:
    """The panel's one-line status after a job of ``kind`` with its ``report``."""
    if kind == "click":
        text = (f"{report['latencyMs']:.0f} ms (adaptation {report['adaptMs']:.0f} ms), {report['clicks']} click(s) "
                f"on slice {report['sliceAxis']}={report['sliceIndex']}")
        return text + (f"; propagated to {len(report['propagatedSlices'])} slice(s)" if "propagatedSlices" in report else "")
    if kind == "propagate":
        return (f"Propagated from slice {report['sliceAxis']}={report['origin']} to {len(report['slices'])} slice(s) "
                f"({report['latencyMs']:.0f} ms)")
    if kind == "accept":
        return f"Accepted {len(report['slices'])} slice(s) ({report['latencyMs']:.0f} ms): {report['message']}"
    return "Discarded" if kind == "discard" else f"Undone: {report.get('clicks', 0)} click(s) left"


class UndoStates:
    """Segment Editor undo states (the Widget passes its embedded ``qMRMLSegmentEditorWidget``'s):
    ``save()`` = ``saveStateForUndo()``, ``undo()`` = ``undo()``, ``stamp()`` = a number that changes
    whenever the segment's labelmap changes (its MTime). Without an editor (scripting) nothing is done."""

    def save(self) -> None:
        pass

    def undo(self) -> None:
        pass

    def stamp(self) -> int:
        return 0

    @property
    def active(self) -> bool:
        return False


class EditorUndo(UndoStates):
    """The undo states of a ``qMRMLSegmentEditorWidget`` (``saveStateForUndo``, ``undo``); ``stamp``
    gives the segment's labelmap MTime (``mrml.segment_stamp``)."""

    active = True

    def __init__(self, editor, stamp: Callable[[], int]) -> None:
        self.editor, self.stamp = editor, stamp

    def save(self) -> None:
        self.editor.saveStateForUndo()

    def undo(self) -> None:
        self.editor.undo()


@dataclass
class Marker:
    """The markups control point of one click: ``remove()`` takes it off its point list."""

    remove: Callable[[], None]


class FieldCommit:
    """A text field that acts only on commit (Enter, focus out, a pick from the list), once per new value."""

    def __init__(self, action: Callable[[str], Any], value: str = "") -> None:
        self._action, self.value = action, value

    def commit(self, text: str) -> bool:
        """Run the action with ``text`` if it is not empty and differs from the last committed value."""
        text = (text or "").strip()
        if not text or text == self.value:
            return False
        self._action(text)
        self.value = text
        return True


class PanelController:
    """The panel's behaviour on an :class:`OAIMSSegmentLogic`.

    Args:
        logic: the module's Logic.
        runner: the JobRunner (its pump processes the event loop's non-input events).
        undo_states: the Segment Editor's undo states (default: none).
        report: shows a one-line status or error.
        settings: where committed fields are remembered (``value(key)``, ``setValue(key, value)``: a
            ``qt.QSettings()`` in Slicer, keys :data:`SETTINGS`); None remembers nothing.
    """

    def __init__(self, logic, runner, undo_states: Optional[UndoStates] = None,
                 report: Callable[[str], None] = lambda text: None, settings: Any = None) -> None:
        self.logic, self.runner, self.report, self.settings = logic, runner, report, settings
        self.undoStates = undo_states or UndoStates()
        logic.beforeWrite = self.undoStates.save
        #: The open slice's undoable interactions, in order: ``(marker, stamp)``, the click's marker (None for
        #: a propagation or a scripted click) and ``undoStates.stamp()`` just after it was written.
        self.steps: List[Tuple[Optional[Marker], int]] = []
        self._segmentMarkers: List[Marker] = []  # every marker of the segment (all its slices)
        self.site = FieldCommit(self._setSite, logic.siteName)
        self.store = FieldCommit(self._setStore, logic.storeFolder)
        self.last: dict = {}

    # -- what is enabled ---------------------------------------------------------------------
    def enabled(self) -> dict:
        """``{control: enabled}``: nothing that changes the session while a job runs."""
        idle = not self.runner.busy
        ready = idle and self.logic.card is not None
        worked = bool(self.logic.workedSlices)
        return {"place": ready, "inputs": idle, "site": idle and not worked, "undo": ready and bool(self.steps), "propagate": ready and worked, "proposals": ready and worked,
                "accept": ready and worked, "discard": ready and worked, "model": idle}

    # -- inputs ---------------------------------------------------------------------------------
    def selectInputs(self, volume, segmentation, segmentId: Optional[str]) -> bool:
        """Use these inputs now (a new segment, volume or segmentation takes effect at once; the
        segment left is kept without adapting). True when they changed."""
        logic = self.logic
        if self.runner.busy:  # an editor-node event pumped during a job: take it up afterwards
            self.runner.request(lambda: self.selectInputs(volume, segmentation, segmentId))
            return False
        if logic.card is None or volume is None or segmentation is None:
            return False
        if (logic.volumeNode, logic.segmentationNode) == (volume, segmentation) and segmentId in (None, "", logic.segmentId):
            return False
        self._run(lambda: logic.startSegment(volume, segmentation, segmentId or None))
        self._forget()
        return True

    # -- actions (each through the runner: deferred while a job runs) ---------------------------
    def click(self, ras, positive: bool, orientation, marker: Optional[Marker] = None) -> None:
        """A point placed at world ``ras`` in a view of ``orientation``; its ``marker`` is removed if refused."""
        def action():
            try:
                job = self.logic.prepareClick(ras, positive, orientation)
            except OAIMSError as error:
                if marker is not None:
                    marker.remove()
                self.report(str(error))
                return
            if job.newImage:
                self.steps = []
            if marker is not None:
                self._segmentMarkers.append(marker)
            if not self._finish(job):  # the Logic does not count a click that failed
                if marker is not None:
                    self._segmentMarkers.remove(marker)
                    marker.remove()
                return
            if self.logic.autoPropagate:
                self._propagate(afterClick=True)
            self.steps.append((marker, self.undoStates.stamp()))
        self.runner.request(action)

    def propagate(self) -> None:
        """Fill the structure through the volume from the open slice (an undoable step of its own)."""
        def action():
            if self._propagate(afterClick=False):
                self.steps.append((None, self.undoStates.stamp()))
        self.runner.request(action)

    def _propagate(self, afterClick: bool) -> bool:
        try:
            job = self.logic.preparePropagate(afterClick)
        except OAIMSError as error:
            self.report(str(error))
            return False
        return self._finish(job, quiet=afterClick)

    def undo(self) -> None:
        """Ctrl+Z: a paint stroke made after the last click is undone alone (the editor's state);
        else the last click, its MI update and its write together, and its marker goes."""
        def action():
            states = self.undoStates
            if states.active and self.steps and states.stamp() != self.steps[-1][1]:
                states.undo()  # the top undo state is the clinician's edit, not our click
                self.steps[-1] = (self.steps[-1][0], states.stamp())
                return
            if not self.steps:
                self.report("there is no click to undo")
                return
            try:
                job = self.logic.prepareUndo(restoreSlice=not states.active)
            except OAIMSError as error:
                self.report(str(error))
                return
            marker = self.steps.pop()[0]
            if self._finish(job) and states.active:
                states.undo()
            if marker is not None:
                self._segmentMarkers.remove(marker)
                marker.remove()
        self.runner.request(action)

    def accept(self) -> None:
        """Accept the segment (PI per worked slice, one site version); ``last`` holds the report."""
        self.runner.request(lambda: self._close(self.logic.prepareAccept))

    def discard(self, revertSlices: bool = False) -> None:
        """Drop the segment's model updates (and, if asked, its slices' content)."""
        self.runner.request(lambda: self._close(lambda: self.logic.prepareDiscard(revertSlices)))

    def _close(self, prepare: Callable) -> None:
        try:
            job = prepare()
        except OAIMSError as error:
            self.report(str(error))
            return
        if self._finish(job):
            for marker in self._segmentMarkers:
                marker.remove()
            self._forget()

    def _forget(self) -> None:
        self.steps, self._segmentMarkers = [], []

    def _finish(self, job, quiet: bool = False) -> bool:
        """Compute ``job`` on the worker, apply it here; report its error. True if it succeeded.
        ``quiet``: a propagation after a click adds its slices to the click's status line."""
        try:
            report = self.logic.apply(self.runner.run(lambda: self.logic.compute(job)))
        except OAIMSError as error:
            self.last = {}
            self.report(str(error))
            return False
        if quiet:
            self.last["propagatedSlices"] = report["slices"]
        else:
            self.last = report
        self.report(status_text("click" if quiet else job.kind, self.last))
        return True

    def _run(self, action: Callable[[], Any]) -> bool:
        try:
            action()
            return True
        except OAIMSError as error:
            self.report(str(error))
            return False

    # -- proposals (synchronous: the proposal model is small) ---------------------------------------
    def stepProposal(self, delta: int, k: int = 3) -> None:
        """N / Shift+N: show the next (``delta`` 1) or previous (-1) proposal; the first press makes ``k``."""
        def action():
            logic = self.logic
            try:
                if logic.proposalSegments:
                    shown = logic.stepProposal(delta)
                else:
                    shown = 0 if logic.proposeNextSteps(k) else -1
            except OAIMSError as error:
                return self.report(str(error))
            self.report(f"Proposal {shown + 1} of {len(logic.proposalSegments)} shown: Shift+Return uses it")
        self.runner.request(action)

    def pickProposal(self, index: Optional[int] = None) -> None:
        """Shift+Return: make the proposal shown (or ``index``, 0-based) the segment's mask on this slice."""
        def action():
            if self._run(lambda: self.logic.pickProposal(index)):
                self.report("Proposal used: Accept adapts the model to it")
        self.runner.request(action)

    # -- fields -----------------------------------------------------------------------------------
    def commitSite(self, text: str) -> bool:
        """The site box was committed (Enter, focus out, a pick): open that site once; remember it."""
        return self._commit(self.site, "site", text)

    def commitStore(self, text: str) -> bool:
        """The store folder was committed (Enter, focus out, Browse): use it once; remember it."""
        return self._commit(self.store, "store", text)

    def _commit(self, commit: FieldCommit, key: str, text: str) -> bool:
        if not commit.commit(text):
            return False
        if self.settings is not None:
            self.settings.setValue(SETTINGS[key], commit.value)
        return True

    def siteChoices(self, current: str) -> List[str]:
        """The site list: sites in the store, the default site and ``current``, sorted."""
        return sorted(set(self.logic.sites()) | {DEFAULT_SITE, current})

    def pollInstall(self, process, confirm: Callable[[str], bool], restart: Callable[[], None]) -> bool:
        """One poll (a panel timer) of a :class:`~OAIMSSegment.dependencies.BackgroundProcess` installing the
        packages: shows its last output line; once it ends, says how, and after a success asks
        ``confirm(RESTART_QUESTION)`` and calls ``restart()`` (``slicer.util.restart``) if agreed. True once it ended."""
        lines, code = process.poll()
        if lines:
            self.report(lines[-1])
        if code is None:
            return False
        self.report("Installed." if code == 0 else f"Installation failed (pip exit code {code}); see the Python console.")
        if code == 0 and confirm(RESTART_QUESTION):
            restart()
        return True

    def acceptWarning(self) -> Optional[str]:
        """After Accept: the message to show when the model adapted but was NOT saved, else None."""
        last = self.last
        return last["message"] if last.get("slices") and not last["saved"] and any(r["applied"] for r in last["slices"]) else None

    def _setSite(self, name: str) -> None:
        self._run(lambda: self.logic.setSite(name))

    def _setStore(self, path: str) -> None:
        self._run(lambda: self.logic.setStoreFolder(path))

    # -- scene ------------------------------------------------------------------------------------
    def sceneClosing(self) -> None:
        """The scene starts closing: keep the segment without adapting, forget nodes and markers."""
        self.logic.forgetNodes()
        self._forget()

    def nodeRemoved(self, node) -> None:
        """A node is about to be deleted: if it is the volume or segmentation in use, as :meth:`sceneClosing`."""
        if node is not None and node in (self.logic.volumeNode, self.logic.segmentationNode):
            self.sceneClosing()
