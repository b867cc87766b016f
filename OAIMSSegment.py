"""OAIMSSegment: click-guided segmentation in 3D Slicer that adapts its model online (OAIMS).

Clinicians place foreground / background points in slice views; each click segments the 2D
slice through it with a click-guided U-Net, which adapts after every click (Mid-Interaction,
MI) and when the segment is accepted (Post-Interaction, PI); adapted weights are saved per
site. Method: Xu et al., "You Point, I Learn: Online Adaptation of Interactive Segmentation
Models for Handling Distribution Shifts in Medical Imaging".

Layout: :class:`OAIMSSegmentLogic` (scriptable from the Python console) reads and writes MRML
and runs each action in threading phases; :class:`OAIMSSegmentWidget` only connects Qt to it;
the engine (``OAIMSSegment/``: site_session, session, model, store, next_steps, mrml) does the work.
"""

import os

# Slicer imports this file as the module "OAIMSSegment", which shadows the engine package
# folder of the same name beside it. Giving this module a __path__ makes it a package whose
# submodules are the engine's files, so "from OAIMSSegment import session" resolves to
# OAIMSSegment/session.py here exactly as it does for the command line and the tests.
# (The folder's __init__.py is therefore not run inside Slicer; the engine relies on nothing in it.)
__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "OAIMSSegment")]

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# Only numpy/vtk/MRML below: importable before torch is installed.
from OAIMSSegment import dependencies, mrml
from OAIMSSegment.dependencies import MissingDependenciesError
from OAIMSSegment.errors import OAIMSError, SessionStateError
from OAIMSSegment.segment_session import SliceEdits

#: Name of the site used until the user picks one.
DEFAULT_SITE = "default"

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
            "See docs/SLICER.md in the extension's repository."
        )
        self.parent.acknowledgementText = (
            "Method: W. Xu, Z. Liang, H. Anthony, Y. Ibrahim, F. Cohen, G. Yang, K. Kamnitsas, 'You Point, I Learn: "
            "Online Adaptation of Interactive Segmentation Models for Handling Distribution Shifts in Medical Imaging' "
            "(OAIMS). Next-step proposals: H. E. Wong, J. V. Guttag, A. V. Dalca, 'Probabilistic Interactive "
            "Segmentation for Medical Images'."
        )


@dataclass
class Job:
    """One action (``kind``: click, undo, accept or discard) in three phases: ``prepare*`` makes it
    (main thread: reads MRML, updates what is open), :meth:`OAIMSSegmentLogic.compute` runs it in the
    engine (worker: fills ``report`` and ``mask``, or ``error``), :meth:`OAIMSSegmentLogic.apply`
    shows it (main thread: writes MRML). Every prepared job is applied, in order."""

    kind: str
    slice: Optional[mrml.SegmentedSlice]  # the slice a click or undo acts on
    label: int = 0
    location: Optional[mrml.SliceLocation] = None  # where a click is
    newImage: bool = False  # a click that makes its slice the open image (the one open stays as it is)
    edits: Any = None  # the slice's SliceEdits (click, undo)
    restoreSlice: bool = True  # an undo writes back what the slice held before the click
    finals: dict = field(default_factory=dict)  # accept: {(axis, index): class map the slice holds}
    slices: list = field(default_factory=list)  # discard: SegmentedSlices to restore
    settings: Optional[tuple] = None  # (method, AdaptConfig) taking effect when the segment opens or closes
    report: dict = field(default_factory=dict)
    mask: Optional[np.ndarray] = None  # the class map to show on the slice
    error: Optional[Exception] = None


class OAIMSSegmentLogic(ScriptedLoadableModuleLogic):
    """All behaviour of the module, usable without a GUI (docs/SLICER.md, "Scripting API"). Everything
    about the site (versions, accept, rollback, export...) is the engine's SiteSession; this reads and writes MRML.

    Threading: each action is a :class:`Job`, so that a GUI can run :meth:`compute` on a worker.
    What is open (volume, segmentation, segments, the slice, the clicks on it) is main-thread
    state, updated when a job is *queued*: a click queued on the open slice joins its image even
    before the clicks ahead of it have run. The worker touches only the engine session; the main
    thread reads the session only while no job is pending. :meth:`addClick`, :meth:`undoClick`,
    :meth:`accept` and :meth:`discard` run all three phases at once.
    """

    def __init__(self, storeFolder: Optional[str] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.storeFolder = storeFolder or self.defaultStoreFolder()
        self.siteName = DEFAULT_SITE
        self.modelName: Optional[str] = None
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
        try:
            import PyTorchUtils  # the "PyTorch" extension

            installTorch = lambda: PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)  # noqa: E731
        except ImportError:
            installTorch = None
        dependencies.install_dependencies(self.requirementsPath(), slicer.util.pip_install, installTorch, self.missingDependencies)

    def setupPythonRequirements(self, confirm: Optional[Callable[[str], bool]] = None) -> None:
        """Make sure the engine can be imported; install missing packages only if ``confirm(message)``
        agrees. Never called at import time: the module loads without torch, and the first use asks."""
        dependencies.ensure_dependencies(self.missingDependencies(), confirm, self.installDependencies)

    # -- model, site, settings ----------------------------------------------------------------
    @staticmethod
    def availableModels() -> list:
        """Cards of the shipped models (``Resources/Models``)."""
        from OAIMSSegment.model import list_models

        return list_models()

    @property
    def session(self):
        """The engine's InteractiveSession (None before :meth:`setModel`); read it only while no job is pending."""
        return self._site.session if self._site is not None else None

    @property
    def card(self):
        """The current model's card (None before :meth:`setModel`)."""
        return self._site.session.card if self._site is not None else None

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
        model = load_model(nameOrPath)
        self.adaptOverrides.pop("lr", None)
        self.modelName = str(nameOrPath)
        self._settingsChanged = True
        self._site = SiteSession(InteractiveSession(model, *self._takeSettings()), self.storeFolder, self.siteName)
        self._work = SegmentWork(self._site)
        self._nextSteps = NextSteps(self.proposalModelName)
        self.activeClass = 1
        return model.card

    def setSite(self, name: str) -> dict:
        """Use the site ``name`` (created on first use) and load its current weights. Returns :meth:`siteModelInfo`."""
        self.siteName = name
        self._reopenSite(site=name)
        return self.siteModelInfo()

    def setStoreFolder(self, path: str) -> None:
        """Keep site models in ``path`` (e.g. a shared department folder); reopens the site."""
        self.storeFolder = str(path)
        self._reopenSite(store_folder=self.storeFolder)

    def _reopenSite(self, **where: str) -> None:
        if self._site is not None:
            self._requireIdle()
            self.abandonSegment()
            self._site.open(**where)

    def sites(self) -> list[str]:
        """Sites that already hold adapted models in the store folder."""
        from OAIMSSegment.site_session import SiteSession

        return SiteSession.sites(self.storeFolder)

    def setAdaptation(self, mi: Optional[bool] = None, pi: Optional[bool] = None, sigma: Optional[float] = None,
                      beta: Optional[float] = None, lr: Optional[float] = None, clickLabel: Optional[bool] = None) -> None:
        """Switch MI / PI and set CCG sigma and beta and the learning rate. ``clickLabel``: our MI extension
        (off, as in the paper, by default): MI's pseudo label takes the clicked class within sigma of the
        click (docs/BENCHMARKS.md, 9.1). Takes effect now or, while an image is open or work is queued,
        when it is accepted or discarded (an image is adapted under one set of rules)."""
        if mi is not None:
            self.mi = bool(mi)
        if pi is not None:
            self.pi = bool(pi)
        for key, value in (("sigma", sigma), ("beta", beta), ("lr", lr)):
            if value is not None:
                self.adaptOverrides[key] = float(value)
        if clickLabel is not None:
            self.adaptOverrides["mi_click_label"] = bool(clickLabel)
        self._settingsChanged = True
        if self._site is not None and not self._worked and not self._pending:
            self._site.session.reconfigure(*self._takeSettings())

    def _takeSettings(self) -> Optional[tuple]:
        """``(method, AdaptConfig)`` when the settings changed since they were last taken, else None."""
        if not self._settingsChanged:
            return None
        from OAIMSSegment.session import AdaptConfig, method_name

        self._settingsChanged = False
        return method_name(self.mi, self.pi), AdaptConfig(**self.adaptOverrides)

    def adaptationSettings(self) -> dict:
        """The settings in force: ``mi``, ``pi``, ``sigma``, ``beta``, ``lr`` (the card's unless overridden), ``clickLabel``."""
        config = self._requireSession().config
        return {"mi": self.mi, "pi": self.pi, "sigma": config.sigma, "beta": config.beta, "lr": config.lr,
                "clickLabel": config.mi_click_label}

    def setActiveClass(self, nameOrIndex: Union[str, int]) -> int:
        """The class a positive click adds (multi-class models, e.g. ``"cup"``); returns its index."""
        labels = self._requireSession().card.labels
        index = labels.get(nameOrIndex) if isinstance(nameOrIndex, str) else int(nameOrIndex)
        if index is None or not 0 < index < len(labels):
            raise OAIMSError(f"{nameOrIndex!r} is not a foreground class of this model ({', '.join(n for n in labels if labels[n])})")
        self.activeClass = index
        return index

    def _requireSession(self):
        if self._site is None:
            raise SessionStateError("choose a model first (setModel)")
        return self._site.session

    def _requireIdle(self) -> None:
        if self._pending:
            raise SessionStateError(f"wait for the {self._pending} queued action(s) to finish")

    # -- site model (OAIMSSegment/site_session.py) -------------------------------------------------
    def siteModelInfo(self) -> dict:
        """The site model: site, model, method, storeFolder, version, imagesAdapted, versions (kept), problem."""
        if self._site is None:
            return {"site": self.siteName, "model": None, "method": None, "storeFolder": self.storeFolder,
                    "version": 0, "imagesAdapted": 0, "versions": [], "problem": ""}
        info = self._site.info()
        return {"site": info.site, "model": info.model, "method": info.method, "storeFolder": info.store_folder,
                "version": info.version, "imagesAdapted": info.images, "versions": info.versions, "problem": info.problem}

    def _siteAction(self, name: str, *args):
        self._requireSession()
        self._requireIdle()
        if self._worked:
            raise SessionStateError("accept or discard the current segment first")
        return getattr(self._site, name)(*args)

    def resetSiteModel(self) -> dict:
        """Back to the pretrained model (stored versions are kept: roll back to undo). Returns the site info."""
        self._siteAction("reset")
        return self.siteModelInfo()

    def rollbackSiteModel(self, version: int) -> dict:
        """Make an earlier ``version`` current (0 = pretrained) and use its weights. Returns the site info."""
        self._siteAction("rollback", int(version))
        return self.siteModelInfo()

    def exportSiteModel(self, path: str) -> str:
        """Write the site's current weights and history to one file (to share with another site)."""
        return str(self._siteAction("export", path))

    def importSiteModel(self, path: str) -> dict:
        """Import a file written by :meth:`exportSiteModel` as this site's new current version."""
        self._siteAction("import_archive", path)
        return self.siteModelInfo()

    # -- segments -----------------------------------------------------------------------------
    def startSegment(self, volumeNode, segmentationNode, segmentId: Optional[str] = None) -> dict[int, str]:
        """Segment ``volumeNode`` into ``segmentationNode``; returns ``{class index: segment ID}``: one
        segment per foreground class, ``segmentId`` for class 1 if given, the others found by class name
        or created. Work on a segment that was not accepted is kept without adapting
        (:meth:`abandonSegment`). Raises InvalidImageError when the volume does not fit the model."""
        session = self._requireSession()
        self._requireIdle()
        mrml.check_volume_for_model(volumeNode, session.card.image_channels, f"model '{session.card.name}'")
        self.abandonSegment()
        mrml.prepare_segmentation(segmentationNode, volumeNode)
        classSegments = mrml.class_segments(segmentationNode, session.card.labels, segmentId)
        self.volumeNode, self.segmentationNode, self._classSegments = volumeNode, segmentationNode, classSegments
        return dict(classSegments)

    def abandonSegment(self) -> None:
        """Keep the segment's slices as they are and revert its model updates: no PI, nothing saved
        (another volume, segmentation or segment is chosen, a node is deleted, the scene closes)."""
        if self._worked and self._site is not None:
            self.discard(revertSlices=False)
        self._worked, self._queued, self._open = {}, {}, None

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
        """Main thread: locate a click; on another slice than the open one, make that slice the open
        image (read once per segment: its image and what its segments held). See :meth:`addClick`."""
        self._requireSession()
        if self.volumeNode is None:
            raise SessionStateError("choose a volume and segment first (startSegment)")
        location = mrml.locate_click(self.volumeNode, rasPoint, sliceOrientation)
        key = (location.axis, location.index)
        job = Job("click", None, int(label) if label is not None else (self.activeClass if positive else 0), location)
        if key != self._open:
            if key not in self._worked:
                read = mrml.SegmentedSlice.read(self.volumeNode, self.segmentationNode, self._classSegments, location)
                self._worked[key], self._queued[key] = (read, SliceEdits(location.shape)), 0
            job.newImage, job.settings = True, None if self.workedSlices else self._takeSettings()
            self._open = key
        job.slice, job.edits = self._worked[key]
        self._queued[key] += 1
        return self._queue(job)

    def prepareUndo(self, restoreSlice: bool = True) -> Job:
        """Main thread: queue removing the open slice's last click (and its MI update). ``restoreSlice``
        False leaves the slice to the caller (the panel restores it with the Segment Editor's undo)."""
        if not self._queued.get(self._open):
            raise SessionStateError("there is no click to undo")
        self._queued[self._open] -= 1
        slice_, edits = self._worked[self._open]
        return self._queue(Job("undo", slice_, edits=edits, restoreSlice=restoreSlice))

    def prepareAccept(self) -> Job:
        """Main thread: queue accepting the segment: PI once per worked slice on what it holds now, one site version."""
        if not self.workedSlices:
            raise SessionStateError("nothing to accept: click in a slice first")
        finals = {key: self._worked[key][0].read_classes() for key in self.workedSlices}
        return self._close(Job("accept", None, finals=finals, settings=self._takeSettings()))

    def prepareDiscard(self, revertSlices: bool = False) -> Job:
        """Main thread: queue dropping the segment's model updates; ``revertSlices`` also puts its slices
        back as they were before their first click."""
        slices = [self._worked[key][0] for key in self._worked] if revertSlices else []
        return self._close(Job("discard", None, slices=slices, settings=self._takeSettings()))

    def _close(self, job: Job) -> Job:
        self._worked, self._queued, self._open = {}, {}, None
        return self._queue(job)

    def _queue(self, job: Job) -> Job:
        self._requireSession()
        self._pending += 1
        self._nextSteps.forget()  # a picked proposal is for the mask it was picked on
        return job

    # -- jobs: compute (worker; the engine only, no MRML) -------------------------------------------
    def compute(self, job: Job) -> Job:
        """Worker: run ``job`` in the engine. An error is kept in ``job.error`` for :meth:`apply` to raise."""
        work = self._work
        try:
            if job.kind == "click":
                if job.newImage:
                    work.open((job.location.axis, job.location.index), job.slice.image, job.settings)
                result, location = work.click(job.location.position, job.label), job.location
                job.mask, job.report = result.mask, {
                    "latencyMs": result.latency_ms, "adaptMs": result.adapt_ms, "loss": result.loss, "label": job.label,
                    "ijk": location.ijk, "pixel": location.position, "sliceAxis": "IJK"[location.axis],
                    "sliceIndex": location.index, "newImage": job.newImage, "clicks": len(self._site.session.clicks),
                    "foregroundPixels": int((result.mask > 0).sum())}
            elif job.kind == "undo":
                work.undo()
                job.report = {"clicks": len(self._site.session.clicks)}
            elif job.kind == "accept":
                started = time.perf_counter()
                job.report = work.accept(job.finals, job.settings).report((time.perf_counter() - started) * 1000.0)
            else:
                work.discard(job.settings)
                job.report = {"discarded": True}
        except Exception as error:  # raised again on the main thread by apply()
            job.error = error
        return job

    # -- jobs: apply (main thread) ------------------------------------------------------------------
    def apply(self, job: Job) -> dict:
        """Main thread: show ``job``'s result and return its report, or raise the error :meth:`compute`
        met (then, once no job is pending, the open slice's click count is read back from the session)."""
        self._pending -= 1
        if job.error is not None:
            if not self._pending and self._open is not None:
                session = self._site.session
                self._queued[self._open] = len(session.clicks) if session.active else 0
                if not session.active:
                    self._open = None
            raise job.error
        self._removeProposalSegments()
        if job.kind == "click":
            merged = job.edits.merge(job.mask, job.slice.read_classes(), job.location.position)
            self.beforeWrite()
            job.slice.write(merged)
        elif job.kind == "undo":
            content = job.edits.undo()
            if job.restoreSlice:
                job.slice.write(content)
        for slice_ in job.slices:
            slice_.restore()
        return job.report

    def addClick(self, rasPoint, positive: bool = True, sliceOrientation: Union[str, Any] = "Axial",
                 label: Optional[int] = None) -> dict:
        """Click at world RAS ``rasPoint`` in a view of ``sliceOrientation`` (``"Axial"``, ``"Coronal"``,
        ``"Sagittal"`` or the view's slice node): ``positive`` adds the active class, else background
        (``label`` sets the class). Manual edits on the slice stay, except within
        ``EDIT_OVERRIDE_RADIUS_PX`` of the click. A click on another slice keeps the previous slice as
        it is (nothing is accepted or saved). Returns latencyMs, adaptMs, loss, label, ijk, pixel,
        sliceAxis, sliceIndex, newImage, clicks (on this slice) and foregroundPixels (of the prediction)."""
        return self.apply(self.compute(self.prepareClick(rasPoint, positive, sliceOrientation, label)))

    def undoClick(self, restoreSlice: bool = True) -> dict:
        """Undo the open slice's last click and its MI update; the slice gets back what it held just
        before that click. Returns ``{"clicks": clicks left}``."""
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
        """Show ``k`` proposed larger segments of the active class on the current slice, as temporary
        segments. Returns their segment IDs; :meth:`pickProposal` makes one the current mask."""
        session = self._requireSession()
        self._requireIdle()
        image = self._worked[self._open][0].image if self._open is not None else None
        proposals = self._nextSteps.propose(session, image, self.activeClass, k, seed)
        self._removeProposalSegments()
        segmentIds = []
        for number, proposal in enumerate(proposals, start=1):
            segmentIds.append(mrml.ensure_segment(self.segmentationNode, f"{PROPOSAL_SEGMENT_PREFIX} {number}"))
            self._worked[self._open][0].write(proposal.astype(np.uint8), {1: segmentIds[-1]})
        return segmentIds

    def pickProposal(self, index: int) -> dict:
        """Make proposal ``index`` (0-based) the current mask of the active class; Accept then adapts to it."""
        session = self._requireSession()
        self._requireIdle()
        mask = self._nextSteps.pick(session, index, self.activeClass)
        self._removeProposalSegments()
        self._worked[self._open][0].write(mask)
        return {"foregroundPixels": int((mask > 0).sum())}

    def _removeProposalSegments(self) -> None:
        if self.segmentationNode is not None:
            mrml.remove_segments_named(self.segmentationNode, PROPOSAL_SEGMENT_PREFIX)


class OAIMSSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt front end: forwards user actions to the Logic; each action's compute phase runs on one worker thread."""

    #: Show the busy indicator only when work takes longer than this (seconds).
    BUSY_DELAY_S = 1.0

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._executor = None
        self._jobs: list = []  # (future of Logic.compute, started) in submission order
        self._pointLists: dict[bool, Any] = {}
        self._placed: list = []  # (point list, control point index) per click, for undo

    def setup(self) -> None:
        import concurrent.futures

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OAIMSSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = OAIMSSegmentLogic(storeFolder=qt.QSettings().value("OAIMSSegment/StoreFolder") or None)
        # One persistent worker: the engine's session is not thread-safe and clicks must run in order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="OAIMSSegment")
        self._timer = qt.QTimer()
        self._timer.setInterval(50)
        self._timer.connect("timeout()", self._poll)

        self.ui.storeFolderPathLineEdit.currentPath = self.logic.storeFolder
        self.ui.siteComboBox.addItem(DEFAULT_SITE)
        self.ui.advancedCollapsibleButton.collapsed = True
        self.ui.busyProgressBar.visible = False

        ui = self.ui
        for widget, signal, slot in (
            (ui.modelComboBox, "currentIndexChanged(int)", self.onModelChanged),
            (ui.siteComboBox, "currentTextChanged(QString)", self.onSiteChanged),
            (ui.storeFolderPathLineEdit, "currentPathChanged(QString)", self.onStoreFolderChanged),
            (ui.inputVolumeSelector, "currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged),
            (ui.segmentSelectorWidget, "currentSegmentChanged(QString)", self.onInputsChanged),
            (ui.classComboBox, "currentIndexChanged(int)", self.onClassChanged),
            *((box, "toggled(bool)", self.onAdaptationChanged) for box in (ui.miCheckBox, ui.piCheckBox, ui.clickLabelCheckBox)),
            *((box, "valueChanged(double)", self.onAdaptationChanged) for box in (ui.sigmaSpinBox, ui.betaSpinBox, ui.lrSpinBox)),
            (ui.undoButton, "clicked(bool)", lambda: self._queue(self.logic.prepareUndo, self._unplaceLast)),
            (ui.acceptButton, "clicked(bool)", lambda: self._queue(self.logic.prepareAccept)),
            (ui.discardButton, "clicked(bool)", lambda: self._queue(self.logic.prepareDiscard, self._clearPoints)),
            (ui.resetSiteButton, "clicked(bool)", self.onResetSite),
            (ui.rollbackButton, "clicked(bool)", lambda: self._runNow(self.logic.rollbackSiteModel, int(ui.rollbackSpinBox.value))),
            (ui.exportButton, "clicked(bool)", lambda: self._archiveAction(qt.QFileDialog.getSaveFileName, "Export", self.logic.exportSiteModel)),
            (ui.importButton, "clicked(bool)", lambda: self._archiveAction(qt.QFileDialog.getOpenFileName, "Import", self.logic.importSiteModel)),
            (ui.proposeButton, "clicked(bool)", self.onPropose),
            (ui.pickProposalButton, "clicked(bool)", lambda: self._runNow(self.logic.pickProposal, int(ui.proposalIndexSpinBox.value) - 1)),
        ):
            widget.connect(signal, slot)
        self._listModels()
        self._updateSiteInfo()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def _pointList(self, positive: bool):
        """The markups point list of foreground (``positive``) or background clicks, created on demand."""
        node = self._pointLists.get(positive)
        if node is None or node.GetScene() is None:
            node = mrml.click_point_list(slicer.mrmlScene, positive)
            self.addObserver(node, node.PointPositionDefinedEvent, lambda caller, event, p=positive: self.onPointPlaced(p))
            self._pointLists[positive] = node
            widget = self.ui.foregroundPlaceWidget if positive else self.ui.backgroundPlaceWidget
            widget.setMRMLScene(slicer.mrmlScene)
            widget.setCurrentNode(node)
            widget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        return node

    def enter(self) -> None:
        self._pointList(True)
        self._pointList(False)

    def onPointPlaced(self, positive: bool) -> None:
        node = self._pointLists[positive]
        index = node.GetNumberOfControlPoints() - 1
        ras, sliceNode = mrml.placed_point(slicer.mrmlScene, node, index)
        try:
            self._ensureSegmentStarted()
            job = self.logic.prepareClick(ras, positive, sliceNode or "Axial")
        except OAIMSError as error:
            node.RemoveNthControlPoint(index)
            self._showError(error)
            return
        self._placed.append((node, index))
        self._submit(job)

    def _ensureSegmentStarted(self) -> None:
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.segmentSelectorWidget.currentNode()
        if self.logic.card is None or volume is None or segmentation is None:
            raise OAIMSError("Choose a model, an input volume and a segmentation first.")
        if self.logic.volumeNode is not volume or self.logic.segmentationNode is not segmentation:
            self.logic.startSegment(volume, segmentation, self.ui.segmentSelectorWidget.currentSegmentID() or None)

    def _unplaceLast(self) -> None:
        if self._placed:
            node, index = self._placed.pop()
            if index < node.GetNumberOfControlPoints():
                node.RemoveNthControlPoint(index)

    def _clearPoints(self) -> None:
        for node in self._pointLists.values():
            node.RemoveAllControlPoints()
        self._placed.clear()

    def _queue(self, prepare: Callable[[], Job], then: Optional[Callable[[], None]] = None) -> None:
        """Prepare a job on the main thread (refused with a message if it does not fit) and submit it."""
        try:
            job = prepare()
        except OAIMSError as error:
            self._showError(error)
            return
        if then is not None:
            then()
        self._submit(job)

    def _submit(self, job: Job) -> None:
        """Run ``logic.compute(job)`` on the worker; :meth:`_poll` applies it on the main thread (MRML)."""
        self._jobs.append((self._executor.submit(self.logic.compute, job), time.monotonic()))
        self._setButtonsEnabled(False)
        self._timer.start()

    def _poll(self) -> None:
        while self._jobs and self._jobs[0][0].done():
            job = self._jobs.pop(0)[0].result()
            try:
                self._show(job, self.logic.apply(job))
            except Exception as error:  # shown to the user; the Logic's state is consistent
                self._showError(error)
        self.ui.busyProgressBar.visible = bool(self._jobs) and time.monotonic() - self._jobs[0][1] > self.BUSY_DELAY_S
        if not self._jobs:
            self._timer.stop()
            self._setButtonsEnabled(True)
            self._updateSiteInfo()

    def _setButtonsEnabled(self, enabled: bool) -> None:
        for button in (self.ui.undoButton, self.ui.acceptButton, self.ui.discardButton, self.ui.proposeButton,
                       self.ui.pickProposalButton, self.ui.siteCollapsibleButton, self.ui.modelComboBox):
            button.enabled = enabled

    def _show(self, job: Job, report: dict) -> None:
        if job.kind == "click":
            self.ui.latencyLabel.text = (
                f"{report['latencyMs']:.0f} ms (adaptation {report['adaptMs']:.0f} ms), "
                f"{report['clicks']} click(s) on slice {report['sliceAxis']}={report['sliceIndex']}"
            )
            if report["previousImage"]:
                self.ui.statusLabel.text = f"Previous slice accepted: {report['previousImage']['message']}"
        elif job.kind == "accept":
            self._clearPoints()
            self.ui.statusLabel.text = f"Accepted ({report['latencyMs']:.0f} ms): {report['message']}"
            if not report["saved"] and report["applied"]:
                slicer.util.warningDisplay(report["message"], windowTitle="OAIMS Segment")

    def _showError(self, error: Union[Exception, str]) -> None:
        self.ui.statusLabel.text = str(error)
        logging.error(f"OAIMSSegment: {error}")

    def _updateSiteInfo(self) -> None:
        info = self.logic.siteModelInfo()
        images = "unknown" if info["imagesAdapted"] is None else info["imagesAdapted"]
        text = f"Site '{info['site']}': version {info['version']}, images adapted: {images}"
        self.ui.siteInfoLabel.text = text + (f"\nNot saving: {info['problem']}" if info["problem"] else "")
        self.ui.rollbackSpinBox.maximum = max(info["versions"] or [0])

    def _listModels(self) -> None:
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItem("(select a model)", "")
        if self.logic.missingDependencies():
            self.ui.modelComboBox.addItem("Install dependencies and list models...", "__install__")
            return
        for card in self.logic.availableModels():
            self.ui.modelComboBox.addItem(f"{card.name}: {card.task}", card.name)

    def onModelChanged(self, index: int) -> None:
        name = self.ui.modelComboBox.itemData(index)
        if name == "__install__":
            try:
                with slicer.util.WaitCursor():
                    self.logic.setupPythonRequirements(confirm=slicer.util.confirmOkCancelDisplay)
            except OAIMSError as error:
                slicer.util.errorDisplay(str(error), windowTitle="OAIMS Segment")
                return
            self._listModels()
            return
        if not name or not self._runNow(self.logic.setModel, name):
            return
        self._clearPoints()
        self.ui.classComboBox.clear()
        for className, classIndex in sorted(self.logic.card.labels.items(), key=lambda item: item[1]):
            if classIndex:
                self.ui.classComboBox.addItem(className, classIndex)
        settings = self.logic.adaptationSettings()
        for widget, key, value in ((self.ui.sigmaSpinBox, "sigma", "value"), (self.ui.betaSpinBox, "beta", "value"),
                                   (self.ui.lrSpinBox, "lr", "value"), (self.ui.clickLabelCheckBox, "clickLabel", "checked")):
            wasBlocked = widget.blockSignals(True)
            setattr(widget, value, settings[key])
            widget.blockSignals(wasBlocked)

    def onSiteChanged(self, name: str) -> None:
        if name:
            self._runNow(self.logic.setSite, name)

    def onStoreFolderChanged(self, path: str) -> None:
        qt.QSettings().setValue("OAIMSSegment/StoreFolder", path)
        self._runNow(self.logic.setStoreFolder, path)

    def onInputsChanged(self, *_: Any) -> None:
        # The Logic starts the segment lazily at the next click (see _ensureSegmentStarted).
        self._clearPoints()

    def onClassChanged(self, index: int) -> None:
        if index >= 0 and self.logic.card is not None:
            self.logic.setActiveClass(int(self.ui.classComboBox.itemData(index)))

    def onAdaptationChanged(self, *_: Any) -> None:
        ui = self.ui
        self.logic.setAdaptation(mi=ui.miCheckBox.checked, pi=ui.piCheckBox.checked, sigma=ui.sigmaSpinBox.value,
                                 beta=ui.betaSpinBox.value, lr=ui.lrSpinBox.value, clickLabel=ui.clickLabelCheckBox.checked)

    def onPropose(self) -> None:
        count = int(self.ui.proposalCountSpinBox.value)
        if self._runNow(self.logic.proposeNextSteps, count):
            self.ui.proposalIndexSpinBox.maximum = count

    def _runNow(self, action: Callable, *args: Any) -> bool:
        """Run a Logic action now, on the main thread; show its error; refresh the site line. True if it succeeded."""
        try:
            with slicer.util.WaitCursor():
                action(*args)
            return True
        except OAIMSError as error:
            self._showError(error)
            return False
        finally:
            self._updateSiteInfo()

    def onResetSite(self) -> None:
        if slicer.util.confirmOkCancelDisplay("Reset this site to the pretrained model? Saved versions are kept."):
            self._runNow(self.logic.resetSiteModel)

    def _archiveAction(self, askPath: Callable, verb: str, action: Callable[[str], Any]) -> None:
        path = askPath(None, f"{verb} site model", "", "OAIMS site model (*.oaims.zip)")
        if path:
            self._runNow(action, path)


class OAIMSSegmentTest(ScriptedLoadableModuleTest):
    """End-to-end Logic test on a synthetic volume; runs in Slicer's "Reload and Test" and in pytest."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear(0)

    def runTest(self) -> None:
        self.setUp()
        self.test_LogicWorkflow()

    def test_LogicWorkflow(self) -> None:
        import tempfile

        logic = OAIMSSegmentLogic(storeFolder=tempfile.mkdtemp(prefix="oaims-sites-"))
        missing = logic.missingDependencies()
        cards = [card for card in logic.availableModels() if card.image_channels == 1] if not missing else []
        if not cards:
            self.delayDisplay(f"Skipped: missing {', '.join(missing)}" if missing else
                              "Skipped: no single-channel model is shipped in Resources/Models")
            return
        self.delayDisplay(f"Model {cards[0].name}")
        logic.setModel(cards[0].name)
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
        resumed = OAIMSSegmentLogic(storeFolder=logic.storeFolder)
        resumed.setModel(cards[0].name)
        self.assertEqual(resumed.setSite("selftest")["version"], 1)
        logic.resetSiteModel()
        self.assertEqual(logic.siteModelInfo()["version"], 0)
        self.delayDisplay("Test passed")
