"""OAIMSSegment: click-guided segmentation in 3D Slicer that adapts its model online (OAIMS).

Each click segments the 2D slice through it with a click-guided U-Net that adapts after every click
(MI) and when the segment is accepted (PI); adapted weights are saved per site (Xu et al., OAIMS).
:class:`OAIMSSegmentLogic` (scriptable) reads and writes MRML in job phases; :class:`OAIMSSegmentWidget`
is Qt glue over ``OAIMSSegment/module_state.py``; the engine (``OAIMSSegment/``) does the work.
"""

import os

# Slicer imports this file as the module "OAIMSSegment", which shadows the engine package
# folder of the same name beside it. Giving this module a __path__ makes it a package whose
# submodules are the engine's files, so "from OAIMSSegment import session" resolves to
# OAIMSSegment/session.py here exactly as it does for the command line and the tests.
# (The folder's __init__.py is therefore not run inside Slicer; the engine relies on nothing in it.)
__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "OAIMSSegment")]

from typing import Any, Callable, Optional, Union

import numpy as np
import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

# Only numpy/MRML below: importable before torch is installed.
from OAIMSSegment import dependencies, mrml
from OAIMSSegment.dependencies import MissingDependenciesError  # noqa: F401  (scripting: OAIMSSegment.MissingDependenciesError)
from OAIMSSegment.errors import SessionStateError
from OAIMSSegment.logic_site import ModelSiteLogic
from OAIMSSegment.module_state import DEFAULT_SITE, SETTINGS, SHORTCUTS, Job, compute_job
from OAIMSSegment.panel import SIGNALS, Gui, Panel, slot_arguments
from OAIMSSegment.runner import JobRunner
from OAIMSSegment.segment_propagation import REFRESH_AFTER_ADAPTATION, PropagatedSlices, PropagationStep
from OAIMSSegment.segment_session import SliceEdits

#: Shipped proposal model for "propose next steps".
DEFAULT_PROPOSAL_MODEL = "proposals-synthetic-disks"

#: Name prefix of the temporary segments that show proposals.
PROPOSAL_SEGMENT_PREFIX = "OAIMS proposal"


class OAIMSSegment(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "OAIMS Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["OAIMSSegment developers"]
        self.parent.helpText = (
            "Interactive segmentation that learns from your clicks. Place foreground and background points in any "
            "slice view: the slice through each point is segmented by a click-guided U-Net, which adapts after every "
            "click (Mid-Interaction adaptation, MI) and when you accept the segment (Post-Interaction adaptation, PI). "
            "Adapted weights are saved per site, so the model keeps improving on your scanner and protocol. "
            "See docs/SLICER.md in the extension's repository. Keys while the module is shown: "
            + "; ".join(f"{key}: {what}" for key, _, what in SHORTCUTS) + "."
        )
        self.parent.acknowledgementText = (
            "Method: W. Xu, Z. Liang, H. Anthony, Y. Ibrahim, F. Cohen, G. Yang, K. Kamnitsas, 'You Point, I Learn: "
            "Online Adaptation of Interactive Segmentation Models for Handling Distribution Shifts in Medical Imaging' "
            "(OAIMS). Next-step proposals: H. E. Wong, J. V. Guttag, A. V. Dalca, 'Probabilistic Interactive "
            "Segmentation for Medical Images'."
        )


class OAIMSSegmentLogic(ScriptedLoadableModuleLogic, ModelSiteLogic):
    """All behaviour of the module, usable without a GUI (docs/SLICER.md, "Scripting API"). Everything
    about the site (versions, accept, rollback, export...) is the engine's SiteSession; the model, device,
    settings and site-model methods are :class:`~OAIMSSegment.logic_site.ModelSiteLogic`; this reads and writes MRML.

    Threading: each action is a :class:`Job`, so that a GUI can run :meth:`compute` on a worker. What is
    open (volume, segmentation, segments, the worked slices, clicks queued) is main-thread state updated
    when a job is *queued*; the worker touches only the engine. :meth:`addClick`, :meth:`undoClick`,
    :meth:`accept` and :meth:`discard` run all three phases at once.
    """

    def __init__(self, storeFolder: Optional[str] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.storeFolder = storeFolder or self.defaultStoreFolder()
        self.siteName = DEFAULT_SITE
        self.modelName: Optional[str] = None
        self.device = "cpu"  # the torch device the model computes on (setDevice)
        self.mi = True
        self.pi = True
        #: AdaptConfig overrides (sigma, beta, lr, mi_click_label); unset ones keep the engine's defaults.
        self.adaptOverrides: dict[str, Union[float, bool]] = {}
        self.activeClass = 1
        self.proposalModelName = DEFAULT_PROPOSAL_MODEL
        self._site = None  # SiteSession: the model, its interactive session and the site's versions
        self._nextSteps = None  # NextSteps (with the model): proposals for the open image, and the one picked
        self._settingsChanged = False
        # What is open: main thread only, updated when a job is queued. Read-only outside the Logic:
        self.volumeNode = None  # the volume being segmented (None before startSegment)
        self.segmentationNode = None  # the segmentation being written
        self._classSegments: dict[int, str] = {}
        self._worked: dict = {}  # {(axis, index): (SegmentedSlice, SliceEdits)}: the segment's slices
        self._queued: dict = {}  # {(axis, index): clicks queued on it}
        self._open: Optional[tuple] = None  # (axis, index) of the open image
        self._pending = 0  # jobs prepared and not yet applied
        self._propagated = PropagatedSlices()  # slices propagation filled, and its undo steps
        self._volumeSlices: dict = {}  # {axis: (S, C, H, W) copy of the volume} for propagation
        #: After each click, propagate its slice through the volume (:meth:`propagate`); off by default.
        self.autoPropagate = False
        #: How propagation seeds a slice and when it stops (``OAIMSSegment.volume.Propagation``; None: its defaults).
        self.propagationRule = None
        #: A propagation after a click that made an MI step also re-propagates from every other worked slice of its
        #: axis with the adapted weights (``VolumeSession.refresh_after_adaptation``, docs/BENCHMARKS.md 10.10).
        self.refreshAfterAdaptation = REFRESH_AFTER_ADAPTATION
        self._clickAdapted = False  # the last click applied made an MI step
        self._work = None  # SegmentWork on the site (worker side)
        #: Called on the main thread just before a click writes its slice (the panel saves a Segment Editor undo state).
        self.beforeWrite: Callable[[], None] = lambda: None

    # -- where things live, dependencies (OAIMSSegment/dependencies.py) ---------------------------
    @staticmethod
    def defaultStoreFolder() -> str:
        """``<Slicer settings folder>/OAIMSSegment/sites``: per user, beside Slicer's own settings."""
        app = getattr(slicer, "app", None)
        settingsFile = getattr(app, "slicerUserSettingsFilePath", "") if app is not None else ""
        base = os.path.dirname(settingsFile) if settingsFile else os.path.join(os.path.expanduser("~"), ".oaimssegment")
        return os.path.join(base, "OAIMSSegment", "sites")

    @staticmethod
    def requirementsPath() -> str:
        """``Resources/requirements.txt``: what a first use installs with pip."""
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    @staticmethod
    def missingDependencies() -> list[str]:
        """Pip names of engine packages that cannot be imported (empty when all are there)."""
        return dependencies.missing_dependencies()

    def installDependencies(self) -> None:
        """Install the engine's packages: PyTorch through the PyTorch Utils extension when it is
        installed (it picks the right CUDA/CPU build), then the rest with pip."""
        dependencies.install_dependencies(self.requirementsPath(), slicer.util.pip_install, self._torchInstaller(), self.missingDependencies)

    @staticmethod
    def _torchInstaller() -> Optional[Callable[[], Any]]:
        try:
            import PyTorchUtils  # the "PyTorch" extension
        except ImportError:
            return None
        return lambda: PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)

    def installInBackground(self):
        """Install torch through PyTorch Utils if missing (never pip), then the rest with pip in a separate
        process; returns its :class:`dependencies.BackgroundProcess` (poll it for output and the exit code)."""
        import shutil
        import sys

        dependencies.ensure_torch(self._torchInstaller())
        return dependencies.pip_in_background(shutil.which("PythonSlicer") or sys.executable, self.requirementsPath())

    def setupPythonRequirements(self, confirm: Optional[Callable[[str], bool]] = None) -> None:
        """Make sure the engine can be imported; install missing packages only if ``confirm(message)``
        agrees. Never called at import time: the module loads without torch, and the first use asks."""
        dependencies.ensure_dependencies(self.missingDependencies(), confirm, self.installDependencies)

    # -- model (the rest: OAIMSSegment/logic_site.py) ---------------------------------------------
    def setModel(self, nameOrPath: str):
        """Load a shipped model by name (or a model card / weights path), open the site's version of it and
        return its card. An image still open is discarded. The adaptation learning rate goes back to
        the card's (a learning rate belongs to a model); MI/PI, sigma and beta are kept."""
        self.setupPythonRequirements()
        from OAIMSSegment.model import load_model
        from OAIMSSegment.next_steps import NextSteps
        from OAIMSSegment.session import InteractiveSession
        from OAIMSSegment.segment_session import SegmentWork
        from OAIMSSegment.site_session import SiteSession

        self._requireIdle()
        self.abandonSegment()
        model = load_model(nameOrPath).to(self.device)
        self.adaptOverrides.pop("lr", None)
        self.modelName = str(nameOrPath)
        self._settingsChanged = True
        self._site = SiteSession(InteractiveSession(model, *self._takeSettings()), self.storeFolder, self.siteName)
        self._work = SegmentWork(self._site)
        self._nextSteps = NextSteps(self.proposalModelName)
        self.activeClass = 1
        return model.card

    # -- segments -----------------------------------------------------------------------------
    def startSegment(self, volumeNode, segmentationNode, segmentId: Optional[str] = None) -> dict[int, str]:
        """Segment ``volumeNode`` into ``segmentationNode``; returns ``{class index: segment ID}`` (``segmentId``
        for class 1 if given, the others by class name or created). Unaccepted work is abandoned (kept, not
        adapted). Raises InvalidImageError when the volume does not fit the model."""
        session = self._requireSession()
        self._requireIdle()
        mrml.check_volume_for_model(volumeNode, session.card.image_channels, f"model '{session.card.name}'")
        self.abandonSegment()
        mrml.prepare_segmentation(segmentationNode, volumeNode)
        classSegments = mrml.class_segments(segmentationNode, session.card.labels, segmentId)
        self.volumeNode, self.segmentationNode, self._classSegments = volumeNode, segmentationNode, classSegments
        self._volumeSlices = {}
        return dict(classSegments)

    def abandonSegment(self) -> None:
        """Keep the segment's slices as they are and revert its model updates: no PI, nothing saved
        (another volume, segmentation or segment is chosen, a node is deleted, the scene closes)."""
        if self._worked and self._site is not None:
            self.discard(revertSlices=False)
        self._worked, self._queued, self._open = {}, {}, None
        self._propagated.clear()

    def forgetNodes(self) -> None:
        """:meth:`abandonSegment` and forget the volume and segmentation (the scene closes, a node is deleted)."""
        self.abandonSegment()
        self.volumeNode, self.segmentationNode, self._classSegments = None, None, {}

    @property
    def segmentId(self) -> Optional[str]:
        """The segment being drawn (class 1's), None before :meth:`startSegment`."""
        return self._classSegments.get(1)

    @property
    def workedSlices(self) -> list:
        """``(axis, index)`` of the segment's slices that hold clicks, in the order they were opened."""
        return [key for key, clicks in self._queued.items() if clicks]

    # -- jobs: prepare (main thread) ------------------------------------------------------------
    def prepareClick(self, rasPoint, positive: bool = True, sliceOrientation: Union[str, Any] = "Axial",
                     label: Optional[int] = None) -> Job:
        """Main thread: locate a click; on another slice, make it the open image (read once). See :meth:`addClick`."""
        self._requireSession()
        if self.volumeNode is None:
            raise SessionStateError("choose a volume and segment first (startSegment)")
        location = mrml.locate_click(self.volumeNode, rasPoint, sliceOrientation)
        key = (location.axis, location.index)
        job = Job("click", None, int(label) if label is not None else (self.activeClass if positive else 0), location)
        if key != self._open:
            if key not in self._worked:
                read = mrml.SegmentedSlice.read(self.volumeNode, self.segmentationNode, self._classSegments, location)
                edits, taken = SliceEdits(location.shape), self._propagated.take(key)
                if taken is not None:  # a correction on a propagated slice: its mask is the model's, its seeds join
                    edits.written, job.seeds = taken.mask, taken.seeds
                self._worked[key], self._queued[key] = (read, edits), 0
            job.newImage, job.settings = True, None if self.workedSlices else self._takeSettings()
            self._open, self._propagated.steps = key, []
        job.slice, job.edits = self._worked[key]
        self._queued[key] += 1
        return self._queue(job)

    def prepareUndo(self, restoreSlice: bool = True) -> Job:
        """Main thread: queue undoing the last interaction on the open slice: a propagation made after
        its last click, else that click with its MI update (and the propagation that followed it).
        ``restoreSlice`` False leaves the slices to the caller (the panel: the Segment Editor's undo)."""
        clicks = self._queued.get(self._open, 0)
        step = self._propagated.pop(clicks, joined=False)
        if step is not None:
            return self._queue(Job("undo", None, restoreSlice=restoreSlice, step=step))
        if not clicks:
            raise SessionStateError("there is no click to undo")
        self._queued[self._open] -= 1
        slice_, edits = self._worked[self._open]
        return self._queue(Job("undo", slice_, edits=edits, restoreSlice=restoreSlice, step=self._propagated.pop(clicks, True)))

    def preparePropagate(self, afterClick: bool = False) -> Job:
        """Main thread: queue propagating what the open slice holds now (edits included) up and down the
        volume along its axis, until the structure ends or a slice worked on (``afterClick``: one undo
        step with the click just made). Needs no job pending (it reads the segment)."""
        self._requireSession()
        self._requireIdle()
        if self._open is None:
            raise SessionStateError("nothing to propagate: click in a slice first")
        (axis, origin), slice_ = self._open, self._worked[self._open][0]
        if axis not in self._volumeSlices:
            self._volumeSlices[axis] = mrml.volume_slices(self.volumeNode, axis)
        step = PropagationStep(axis, self._queued[self._open], afterClick)
        self._propagated.steps.append(step)
        origins = [self._open]
        if afterClick and self._clickAdapted and self.refreshAfterAdaptation:
            origins += [key for key in self.workedSlices if key[0] == axis and key != self._open]
        worked = {index for a, index in self._worked if a == axis}
        inputs = [{"slices": self._volumeSlices[axis], "spacing": self._worked[key][0].spacing, "origin": key[1],
                   "origin_mask": self._worked[key][0].read_classes(), "blocked": worked - {key[1]},
                   "rule": self.propagationRule, "former": self._propagated.former(key)} for key in origins]
        return self._queue(Job("propagate", slice_, step=step, inputs=inputs[0], refresh=inputs[1:]))

    def prepareAccept(self) -> Job:
        """Main thread: queue accepting the segment: PI once per worked slice on what it holds now (and on each
        propagated slice the clinician edited since, with its seeds as its clicks), one site version."""
        if not self.workedSlices:
            raise SessionStateError("nothing to accept: click in a slice first")
        finals = {key: self._worked[key][0].read_classes() for key in self.workedSlices}
        edited = {}
        for key, propagated in self._propagated.slices.items():
            held = self._sliceAccess(key[0])[0](key[1])
            if not np.array_equal(held, propagated.mask):
                location = mrml.slice_location(self.volumeNode, *key)
                finals[key], edited[key] = held, (mrml.extract_slice(self.volumeNode, location),
                                                  mrml.in_plane_spacing(self.volumeNode, key[0]), propagated.seeds)
        return self._close(Job("accept", None, finals=finals, settings=self._takeSettings(), inputs={"edited": edited}))

    def prepareDiscard(self, revertSlices: bool = False) -> Job:
        """Main thread: queue dropping the segment's model updates (``revertSlices``: and its slices' content)."""
        slices = [self._worked[key][0] for key in self._worked] if revertSlices else []
        return self._close(Job("discard", None, slices=slices, settings=self._takeSettings()))

    def _close(self, job: Job) -> Job:
        self._worked, self._queued, self._open = {}, {}, None
        self._propagated.clear()
        return self._queue(job)

    def _queue(self, job: Job) -> Job:
        self._requireSession()
        self._pending += 1
        self._nextSteps.forget()  # a picked proposal is for the mask it was picked on
        return job

    # -- jobs: compute (worker; the engine only, no MRML) -------------------------------------------
    def compute(self, job: Job) -> Job:
        """Worker: run ``job`` in the engine. An error is kept in ``job.error`` for :meth:`apply` to raise."""
        return compute_job(self._work, job)

    # -- jobs: apply (main thread) ------------------------------------------------------------------
    def apply(self, job: Job) -> dict:
        """Main thread: show ``job``'s result and return its report, or raise the error :meth:`compute`
        met (then, once no job is pending, the open slice's click count is read back from the session)."""
        self._pending -= 1
        if job.error is not None:
            if job.step is not None and job.step in self._propagated.steps:  # a propagation that did not happen
                self._propagated.steps.remove(job.step)
            if not self._pending and self._open is not None:
                self._queued[self._open] = self._work.openClicks
                if not self._site.session.active:
                    self._open = None
            raise job.error
        self._removeProposalSegments()
        if job.kind == "click":
            self._clickAdapted = job.report["loss"] is not None
            merged = job.edits.merge(job.mask, job.slice.read_classes(), job.location.position)
            self.beforeWrite()
            job.slice.write(merged)
        elif job.kind == "propagate":
            if not job.step.joined:
                self.beforeWrite()
            changed = set(self._propagated.apply(job.step, job.report["origin"], job.propagated, job.ends,
                                                 *self._sliceAccess(job.step.axis)))
            for origin, propagated, ends in job.refreshed:
                changed |= set(self._propagated.apply(job.step, origin, propagated, ends, *self._sliceAccess(job.step.axis)))
            job.report["slices"] = sorted(changed)
        elif job.kind == "undo":
            if job.slice is not None:
                content = job.edits.undo()
                if job.restoreSlice:
                    job.slice.write(content)
            if job.step is not None:
                job.report["slices"] = self._propagated.undo(job.step, self._sliceAccess(job.step.axis)[1] if job.restoreSlice else None)
        for slice_ in job.slices:
            slice_.restore()
        return job.report

    def _sliceAccess(self, axis: int) -> tuple:
        """``(read(index), write(index, class map))`` of the class segments on slices normal to ``axis``."""
        volume, segmentation, segments = self.volumeNode, self.segmentationNode, dict(self._classSegments)
        at = lambda index: mrml.slice_location(volume, axis, index)  # noqa: E731
        return (lambda index: mrml.read_slice_classes(segmentation, volume, at(index), segments),
                lambda index, mask: mrml.write_slice_mask(segmentation, volume, at(index), mask, segments))

    def addClick(self, rasPoint, positive: bool = True, sliceOrientation: Union[str, Any] = "Axial",
                 label: Optional[int] = None) -> dict:
        """Click at world RAS ``rasPoint`` in a view of ``sliceOrientation`` (``"Axial"``, ``"Coronal"``,
        ``"Sagittal"`` or the view's slice node): ``positive`` adds the active class, else background
        (``label`` sets the class). Manual edits stay, except within ``EDIT_OVERRIDE_RADIUS_PX`` of the click;
        another slice keeps the previous one as it is. Returns latencyMs, adaptMs, loss, label, ijk, pixel,
        sliceAxis, sliceIndex, newImage, clicks (on this slice) and foregroundPixels (of the prediction); with
        :attr:`autoPropagate`, also propagatedSlices (:meth:`propagate`'s ``slices``)."""
        report = self.apply(self.compute(self.prepareClick(rasPoint, positive, sliceOrientation, label)))
        if self.autoPropagate:
            report["propagatedSlices"] = self.apply(self.compute(self.preparePropagate(afterClick=True)))["slices"]
        return report

    def propagate(self) -> dict:
        """Fill the structure through the volume from the open slice, along its axis (one forward pass
        per slice, seeded from its neighbour; no adaptation), stopping where it ends or at a slice worked
        on. Undoable (:meth:`undoClick`). Returns ``slices`` (indices whose content changed), ``sliceAxis``,
        ``origin`` and ``latencyMs``."""
        return self.apply(self.compute(self.preparePropagate()))

    def undoClick(self, restoreSlice: bool = True) -> dict:
        """Undo the last interaction on the open slice (:meth:`prepareUndo`); the slices get back exactly what
        they held. -> ``{"clicks": n}`` (and ``slices`` a propagation restored)."""
        return self.apply(self.compute(self.prepareUndo(restoreSlice)))

    def accept(self) -> dict:
        """Accept the segment: PI once per slice with clicks, on what that slice holds now (paint and
        erase included), and one new site version. Returns version, saved, message, latencyMs, clicks and
        slices: ``[{"sliceIndex", "acceptedPixels", "applied", "reason"}, ...]``."""
        return self.apply(self.compute(self.prepareAccept()))

    def discard(self, revertSlices: bool = False) -> dict:
        """Revert the segment's model updates; ``revertSlices`` also puts its slices back as they were."""
        return self.apply(self.compute(self.prepareDiscard(revertSlices)))

    # -- proposals (OAIMSSegment/next_steps.py) -------------------------------------------------
    def setProposalModel(self, nameOrPath: str) -> None:
        """Use another proposal model (shipped name or ``.pt`` path) for :meth:`proposeNextSteps`."""
        self.proposalModelName = str(nameOrPath)
        if self._nextSteps is not None:
            self._nextSteps.use(self.proposalModelName)

    def proposeNextSteps(self, k: int = 3, seed: Optional[int] = None) -> list[str]:
        """Make ``k`` proposed larger segments of the active class on the current slice, as temporary segments,
        the first one shown. Returns their segment IDs; :meth:`stepProposal` shows another one and
        :meth:`pickProposal` makes one the current mask."""
        session = self._requireSession()
        self._requireIdle()
        model = self._work.openImage  # (image, InPlaneGrid): proposals are made on the model's grid
        proposals = self._nextSteps.propose(session, model and model[0], self.activeClass, k, seed)
        mrml.remove_segments_named(self.segmentationNode, PROPOSAL_SEGMENT_PREFIX)
        segmentIds = []
        for number, proposal in enumerate(proposals, start=1):
            segmentIds.append(mrml.ensure_segment(self.segmentationNode, f"{PROPOSAL_SEGMENT_PREFIX} {number}"))
            self._worked[self._open][0].write(model[1].mask_from_model(proposal).astype(np.uint8), {1: segmentIds[-1]})
        mrml.show_only_segment(self.segmentationNode, segmentIds, 0)
        return segmentIds

    def stepProposal(self, delta: int = 1) -> int:
        """Show the next (``delta`` 1) or previous (-1) proposal alone, wrapping around; returns its index (0-based)."""
        self._requireSession()
        shown = self._nextSteps.step(delta)
        mrml.show_only_segment(self.segmentationNode, self.proposalSegments, shown)
        return shown

    @property
    def proposalSegments(self) -> list[str]:
        """IDs of the proposal segments shown now, in order (empty when there are none)."""
        segmentation = self.segmentationNode.GetSegmentation() if self.segmentationNode is not None else None
        return [segmentation.GetSegmentIdBySegmentName(f"{PROPOSAL_SEGMENT_PREFIX} {n}") for n in range(1, self._nextSteps.count + 1)] \
            if segmentation is not None and self._nextSteps is not None else []

    def pickProposal(self, index: Optional[int] = None) -> dict:
        """Make proposal ``index`` (0-based; None: the one shown) the current mask of the active class;
        Accept then adapts to it."""
        session = self._requireSession()
        self._requireIdle()
        index = self._nextSteps.shown if index is None else index
        mask = self._work.openImage[1].mask_from_model(self._nextSteps.pick(session, index, self.activeClass))
        self._removeProposalSegments()
        self._worked[self._open][0].write(mask)
        return {"foregroundPixels": int((mask > 0).sum())}

    def _removeProposalSegments(self) -> None:
        if self.segmentationNode is not None:
            mrml.remove_segments_named(self.segmentationNode, PROPOSAL_SEGMENT_PREFIX)
        if self._nextSteps is not None:
            self._nextSteps.clear()


class OAIMSSegmentWidget(ScriptedLoadableModuleWidget):
    """Qt glue only: builds the UI and the embedded Segment Editor, connects ``panel.SIGNALS`` and ``SHORTCUTS`` to
    :class:`~OAIMSSegment.panel.Panel` (all behaviour) and writes its changes back to the widgets."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = self.panel = None
        self._shortcuts, self._timers = [], []  # QShortcuts; QTimers kept alive while they run

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OAIMSSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        settings = qt.QSettings()
        self.logic = OAIMSSegmentLogic(storeFolder=settings.value(SETTINGS["store"]) or None)
        # The Segment Editor beside the tool, on the singleton node (selections carry over to the Segment Editor
        # module); its undo states are ours (Ctrl+Z), its own shortcuts are never installed.
        self.editor = editor = ui.segmentEditorWidget = slicer.qMRMLSegmentEditorWidget()
        editor.setMaximumNumberOfUndoStates(10)
        editor.setMRMLSegmentEditorNode(mrml.segment_editor_node(slicer.mrmlScene))
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setUndoEnabled(False)
        ui.newSegmentationButton = qt.QPushButton("New segmentation")
        for widget in (ui.newSegmentationButton, editor):
            ui.inputsCollapsibleButton.layout().addRow(widget)
        # The store path edit's own line edit and browse button (its only QToolButton; CTK connects browse() to it first).
        ui.storeLineEdit, ui.storeBrowseButton = (slicer.util.findChildren(ui.storeFolderPathLineEdit, className=name)[0]
                                                  for name in ("QLineEdit", "QToolButton"))
        ui.siteLineEdit, places = ui.siteComboBox.lineEdit(), {True: ui.foregroundPlaceWidget, False: ui.backgroundPlaceWidget}
        dialog = lambda save: qt.QFileDialog.getSaveFileName if save else qt.QFileDialog.getOpenFileName  # noqa: E731
        gui = Gui(status=lambda text: setattr(ui.statusLabel, "text", text), ask=slicer.util.confirmOkCancelDisplay,
                  askYesNo=slicer.util.confirmYesNoDisplay, warn=lambda text: slicer.util.warningDisplay(text, windowTitle="OAIMS Segment"),
                  askPath=lambda save, caption, filter: dialog(save)(None, caption, "", filter),
                  place=lambda positive, on: places[positive].setPlaceModeEnabled(on), showPoints=self._showPoints,
                  every=self._every, restart=slicer.util.restart, waitCursor=slicer.util.WaitCursor, show=self._show)
        # Between waits for the worker: disable the controls (first pump of a job), repaint, run timers; input waits.
        pump = lambda: (self._show(), slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents))  # noqa: E731
        self.panel = Panel(self.logic, JobRunner(pump), editor, gui, slicer.mrmlScene, settings)
        for name, signal, method, arguments in SIGNALS:
            getattr(ui, name).connect(signal, self._slot(method, arguments))
        for key, name, _ in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.enabled = False  # live only while the module is entered
            shortcut.connect("activated()", self._slot("act", (name,)))
            self._shortcuts.append(shortcut)
        self.panel.setup(settings.value(SETTINGS["site"]))
        self._show()

    def _slot(self, method: str, arguments: tuple) -> Callable[..., None]:
        """``*args``, so PythonQt passes all the signal's arguments (PythonQtSignalTarget::call); then show the changes."""
        def slot(*signalArgs: Any) -> None:
            getattr(self.panel, method)(*slot_arguments(arguments, signalArgs, lambda name: getattr(self.ui, name)))
            self._show()
        return slot

    def _show(self) -> None:
        for name, values in self.panel.changes().items():
            widget = getattr(self.ui, name)
            wasBlocked = widget.blockSignals(True)  # what the panel shows is not a user's action
            for prop, value in values.items():
                if prop == "items":
                    widget.clear()
                    for text, data in value:
                        widget.addItem(text, data)
                else:
                    setattr(widget, prop, value)
            widget.blockSignals(wasBlocked)

    def _showPoints(self, positive: bool, node) -> None:
        widget = self.ui.foregroundPlaceWidget if positive else self.ui.backgroundPlaceWidget
        widget.setMRMLScene(slicer.mrmlScene)
        widget.setCurrentNode(node)
        widget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

    def _every(self, ms: int, tick: Callable[[], None]) -> Callable[[], None]:
        timer = qt.QTimer()
        timer.connect("timeout()", tick)
        timer.start(ms)
        self._timers.append(timer)
        return timer.stop

    def cleanup(self) -> None:
        self.panel.cleanup()
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()

    def enter(self) -> None:
        self.panel.enter()
        self._enableShortcuts(True)
        self._show()

    def exit(self) -> None:
        self.panel.exit()
        self._enableShortcuts(False)

    def _enableShortcuts(self, enabled: bool) -> None:
        for shortcut in self._shortcuts:
            shortcut.enabled = enabled


class OAIMSSegmentTest(ScriptedLoadableModuleTest):
    """End-to-end Logic test on a synthetic volume; runs in Slicer's "Reload and Test" and in pytest."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_LogicWorkflow()

    def test_LogicWorkflow(self) -> None:
        import tempfile
        import unittest

        missing = OAIMSSegmentLogic.missingDependencies()
        cards = [card for card in OAIMSSegmentLogic.availableModels() if card["image_channels"] == 1]
        if missing or not cards:
            reason = f"missing {', '.join(missing)}" if missing else "no single-channel model in Resources/Models"
            self.delayDisplay(f"OAIMSSegmentTest SKIPPED: {reason}", msec=2000)
            raise unittest.SkipTest(reason)
        with tempfile.TemporaryDirectory(prefix="oaims-sites-") as store:  # no store is left behind
            self._workflow(OAIMSSegmentLogic(storeFolder=store), cards[0]["name"])

    def _workflow(self, logic: "OAIMSSegmentLogic", modelName: str) -> None:
        self.delayDisplay(f"Model {modelName}")
        logic.setModel(modelName)
        logic.setSite("selftest")

        # A bright ball in a 64^3 volume with anisotropic spacing and a non-trivial origin.
        k, j, i = np.mgrid[:64, :64, :64]
        voxels = (100.0 * ((k - 32) ** 2 / 0.5 + (j - 30) ** 2 + (i - 34) ** 2 < 14**2) + 10.0).astype(np.float32)
        voxels += np.random.default_rng(0).normal(0, 2, voxels.shape).astype(np.float32)
        ijkToRas = np.diag([0.9, 0.9, 2.0, 1.0])
        ijkToRas[:3, 3] = (-30.0, -25.0, 10.0)
        volume = slicer.util.addVolumeFromArray(voxels, ijkToRas, "ball")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ball segmentation")
        classSegments = logic.startSegment(volume, segmentation)

        centre, outside = (mrml.ijk_to_world(volume) @ np.array([*ijk, 32, 1.0]) for ijk in ((34, 30), (5, 5)))
        report = logic.addClick(centre[:3], positive=True, sliceOrientation="Axial")
        self.assertEqual(report["ijk"], (34, 30, 32))
        self.delayDisplay(f"Click: {report['latencyMs']:.0f} ms, {report['foregroundPixels']} px")
        location = mrml.locate_click(volume, centre[:3], "Axial")
        foreground = mrml.read_slice_mask(segmentation, classSegments[1], volume, location).sum()
        self.assertEqual(foreground, report["foregroundPixels"])
        logic.addClick(outside[:3], positive=False, sliceOrientation="Axial")
        self.assertEqual(logic.undoClick()["clicks"], 1)
        logic.addClick(outside[:3], positive=False, sliceOrientation="Axial")
        accepted = logic.accept()  # the second click's MI update changed the model: version 1
        self.delayDisplay(f"Accept: {accepted['message']}")
        self.assertTrue(accepted["saved"])
        self.assertEqual([row["sliceIndex"] for row in accepted["slices"]], [32])
        resumed = OAIMSSegmentLogic(storeFolder=logic.storeFolder)
        resumed.setModel(modelName)
        self.assertEqual(resumed.setSite("selftest")["version"], 1)
        logic.resetSiteModel()
        self.assertEqual(logic.siteModelInfo()["version"], 0)
        self.delayDisplay("Test passed")
