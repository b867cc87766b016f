"""OAIMSSegment: click-guided segmentation in 3D Slicer that adapts its model online (OAIMS).

Clinicians place foreground / background points in slice views; each click segments the
2D slice through it with a click-guided U-Net, which adapts after every click
(Mid-Interaction, MI) and when the segment is accepted (Post-Interaction, PI); adapted
weights are saved per site. Method: Xu et al., "You Point, I Learn: Online Adaptation of
Interactive Segmentation Models for Handling Distribution Shifts in Medical Imaging".

Layout: :class:`OAIMSSegmentLogic` holds all behaviour and is scriptable from the Python
console; :class:`OAIMSSegmentWidget` only connects Qt to it; the engine
(``OAIMSSegment/``: model, session, store, proposals, mrml) does the work.
"""

import os

# Slicer imports this file as the module "OAIMSSegment", which shadows the engine package
# folder of the same name beside it. Giving this module a __path__ makes it a package whose
# submodules are the engine's files, so "from OAIMSSegment import session" resolves to
# OAIMSSegment/session.py here exactly as it does for the command line and the tests.
# (The folder's __init__.py is therefore not run inside Slicer; the engine relies on nothing in it.)
__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "OAIMSSegment")]

import importlib.util
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import ctk
import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Only numpy/vtk/MRML below: importable before torch is installed.
from OAIMSSegment import mrml
from OAIMSSegment.errors import OAIMSError, SessionStateError, StoreError

#: Python modules the engine needs that Slicer does not ship (import name -> pip name).
ENGINE_MODULES: dict[str, str] = {"torch": "torch", "monai": "monai", "scipy": "scipy", "filelock": "filelock"}

#: Name of the site used until the user picks one.
DEFAULT_SITE = "default"

#: Shipped proposal model for "propose next steps".
DEFAULT_PROPOSAL_MODEL = "proposals-synthetic-disks"

#: Name prefix of the temporary segments that show proposals.
PROPOSAL_SEGMENT_PREFIX = "OAIMS proposal"


class MissingDependenciesError(OAIMSError):
    """torch / MONAI (or another engine package) is not installed and was not installed."""


#
# Module
#


class OAIMSSegment(ScriptedLoadableModule):
    """Module description shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "OAIMS Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["OAIMSSegment developers"]
        self.parent.helpText = (
            "Interactive segmentation that learns from your clicks. Place foreground and background "
            "points in any slice view: the slice through each point is segmented by a click-guided "
            "U-Net, which adapts after every click (Mid-Interaction adaptation, MI) and when you accept "
            "the segment (Post-Interaction adaptation, PI). Adapted weights are saved per site, so the "
            "model keeps improving on your scanner and protocol. "
            "See docs/SLICER.md in the extension's repository."
        )
        self.parent.acknowledgementText = (
            "Method: W. Xu, Z. Liang, H. Anthony, Y. Ibrahim, F. Cohen, G. Yang, K. Kamnitsas, "
            "'You Point, I Learn: Online Adaptation of Interactive Segmentation Models for Handling "
            "Distribution Shifts in Medical Imaging' (OAIMS). Next-step proposals: H. E. Wong, "
            "J. V. Guttag, A. V. Dalca, 'Probabilistic Interactive Segmentation for Medical Images'."
        )


#
# Logic
#


@dataclass
class PreparedClick:
    """A click turned into engine terms on the main thread (MRML read), ready for the worker.

    ``image`` is set when the click opens a new image (first click, or another slice).
    """

    location: mrml.SliceLocation
    label: int
    image: Optional[np.ndarray]


@dataclass
class ComputedClick:
    """What the worker computed for a click; :meth:`OAIMSSegmentLogic.applyClick` writes it to MRML."""

    prepared: PreparedClick
    mask: np.ndarray
    report: dict


class OAIMSSegmentLogic(ScriptedLoadableModuleLogic):
    """All behaviour of the module, usable without a GUI::

        logic = OAIMSSegmentLogic()
        logic.setModel("brain-lesion-flair")
        logic.setSite("radiology-3T")
        logic.startSegment(volumeNode, segmentationNode, segmentId)
        logic.addClick([12.0, -30.5, 4.0], positive=True, sliceOrientation="Axial")
        logic.accept()

    Long operations come in three steps so that a GUI can run the middle one on a worker
    thread: ``prepare*`` (main thread, reads MRML), ``compute*`` (engine only, no MRML),
    ``apply*`` (main thread, writes MRML). The one-call methods (:meth:`addClick`,
    :meth:`undoClick`, :meth:`accept`, :meth:`discard`) chain them synchronously.
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
        self._session = None
        self._siteModel = None
        self._siteProblem = ""
        self._proposalModel = None
        self._volumeNode = None
        self._segmentationNode = None
        self._classSegments: dict[int, str] = {}
        self._location: Optional[mrml.SliceLocation] = None
        self._image: Optional[np.ndarray] = None
        self._sliceBefore: dict[int, np.ndarray] = {}
        self._pickedMask: Optional[np.ndarray] = None
        self._proposals: list = []
        self._settingsChanged = False

    # -- where things live ------------------------------------------------------------------

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

    def setStoreFolder(self, path: str) -> None:
        """Keep site models in ``path`` (e.g. a shared department folder); reopens the site."""
        self.storeFolder = str(path)
        if self._session is not None:
            self._openSite()

    # -- dependencies -----------------------------------------------------------------------

    @staticmethod
    def missingDependencies() -> list[str]:
        """Pip names of engine packages that cannot be imported (empty when all are there)."""
        return [pipName for module, pipName in ENGINE_MODULES.items() if importlib.util.find_spec(module) is None]

    def installDependencies(self) -> None:
        """Install the engine's packages: PyTorch through the PyTorch Utils extension when it is
        installed (it picks the right CUDA/CPU build), then the rest with pip from
        ``Resources/requirements.txt``. Raises :class:`MissingDependenciesError` with the reason."""
        try:
            if importlib.util.find_spec("torch") is None:
                try:
                    import PyTorchUtils  # the "PyTorch" extension
                except ImportError:
                    PyTorchUtils = None
                if PyTorchUtils is not None:
                    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                        raise MissingDependenciesError("PyTorch Utils could not install PyTorch")
            slicer.util.pip_install(["-r", self.requirementsPath()])
        except MissingDependenciesError:
            raise
        except Exception as error:  # pip and PyTorch Utils raise many kinds
            raise MissingDependenciesError(
                f"installing {', '.join(self.missingDependencies()) or 'the engine packages'} failed: {error}. "
                f"Check the network connection, or install them from Slicer's Python console with "
                f"slicer.util.pip_install(['-r', r'{self.requirementsPath()}'])"
            ) from error
        importlib.invalidate_caches()
        still = self.missingDependencies()
        if still:
            raise MissingDependenciesError(f"still missing after installation: {', '.join(still)}; restart Slicer and try again")

    def setupPythonRequirements(self, confirm: Optional[Callable[[str], bool]] = None) -> None:
        """Make sure the engine can be imported; install missing packages only if ``confirm(message)`` agrees.

        Never called at import time: the module loads without torch, and the first use asks.
        """
        missing = self.missingDependencies()
        if not missing:
            return
        message = (
            f"OAIMS Segment needs these Python packages: {', '.join(missing)}. "
            "Install them now? This needs a network connection and may take several minutes."
        )
        if confirm is None or not confirm(message):
            raise MissingDependenciesError(f"missing Python packages: {', '.join(missing)} (not installed)")
        self.installDependencies()

    # -- model, site, settings ----------------------------------------------------------------

    @staticmethod
    def availableModels() -> list:
        """Cards of the shipped models (``Resources/Models``)."""
        from OAIMSSegment.model import list_models

        return list_models()

    @property
    def volumeNode(self):
        """The volume being segmented (None before :meth:`startSegment`)."""
        return self._volumeNode

    @property
    def segmentationNode(self):
        """The segmentation being written (None before :meth:`startSegment`)."""
        return self._segmentationNode

    @property
    def card(self):
        """The current model's card (None before :meth:`setModel`)."""
        return self._session.card if self._session is not None else None

    def setModel(self, nameOrPath: str):
        """Load a shipped model by name (or a model card / weights path) and open the site's version of it.

        An image still open is discarded. The adaptation learning rate goes back to the new
        model card's (a learning rate belongs to a model); MI/PI, sigma and beta are kept.
        Returns the model card.
        """
        self.setupPythonRequirements()
        from OAIMSSegment.model import load_model

        self._closeImage()
        model = load_model(nameOrPath)
        self.adaptOverrides.pop("lr", None)
        self.modelName = str(nameOrPath)
        self._session = self._newSession(model)
        self.activeClass = 1
        self._openSite()
        return model.card

    def setSite(self, name: str) -> dict:
        """Use the site ``name`` (created on first use) and load its current weights. Returns :meth:`siteModelInfo`."""
        self.siteName = name
        if self._session is not None:
            self._closeImage()
            self._openSite()
        return self.siteModelInfo()

    def sites(self) -> list[str]:
        """Sites that already hold adapted models in the store folder."""
        from OAIMSSegment.store import SiteModelStore

        return SiteModelStore(self.storeFolder).sites()

    def setAdaptation(
        self,
        mi: Optional[bool] = None,
        pi: Optional[bool] = None,
        sigma: Optional[float] = None,
        beta: Optional[float] = None,
        lr: Optional[float] = None,
        clickLabel: Optional[bool] = None,
    ) -> None:
        """Switch MI / PI and set the advanced parameters (CCG sigma and beta, learning rate).

        ``clickLabel`` turns on our MI extension (off by default, as in the paper): each MI
        step's pseudo label takes the clicked class within sigma of the click
        (``AdaptConfig.mi_click_label``; measured in docs/BENCHMARKS.md, section 9.1).

        Takes effect now, or, while an image is open, when it is accepted or discarded (an
        image is adapted under one set of rules).
        """
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
        if self._session is not None and not self._session.active:
            self._applySettings()

    def adaptationSettings(self) -> dict:
        """The adaptation settings in force: ``mi``, ``pi``, ``sigma``, ``beta``, ``lr`` (the model
        card's learning rate unless overridden) and ``clickLabel``."""
        config = self._requireSession().config
        return {
            "mi": self.mi, "pi": self.pi, "sigma": config.sigma, "beta": config.beta, "lr": config.lr,
            "clickLabel": config.mi_click_label,
        }

    def setActiveClass(self, nameOrIndex: Union[str, int]) -> int:
        """The class a positive click adds (multi-class models, e.g. ``"cup"``); returns its index."""
        labels = self._requireSession().card.labels
        index = labels.get(nameOrIndex) if isinstance(nameOrIndex, str) else int(nameOrIndex)
        if index is None or not 0 < index < len(labels):
            raise OAIMSError(f"{nameOrIndex!r} is not a foreground class of this model ({', '.join(n for n in labels if labels[n])})")
        self.activeClass = index
        return index

    def _newSession(self, model):
        from OAIMSSegment.session import AdaptConfig, InteractiveSession, method_name

        self._settingsChanged = False
        return InteractiveSession(model, method=method_name(self.mi, self.pi), config=AdaptConfig(**self.adaptOverrides))

    def _applySettings(self) -> None:
        """Apply new MI/PI switches and settings, keeping weights and optimizer state."""
        from OAIMSSegment.session import AdaptConfig, method_name

        self._settingsChanged = False
        self._session.reconfigure(method_name(self.mi, self.pi), AdaptConfig(**self.adaptOverrides))

    def _requireSession(self):
        if self._session is None:
            raise SessionStateError("choose a model first (setModel)")
        return self._session

    # -- site store ---------------------------------------------------------------------------

    def _openSite(self) -> None:
        """Open ``siteName`` for the current model and load its current weights (pretrained at version 0).

        A store that cannot be opened (read-only or missing folder) leaves the pretrained model
        in use: segmentation goes on, and :meth:`siteModelInfo` / :meth:`accept` say why nothing is saved.
        """
        from OAIMSSegment.store import SiteModelStore

        session = self._requireSession()
        self._siteModel, self._siteProblem = None, ""
        session.reset_weights()
        try:
            self._siteModel = SiteModelStore(self.storeFolder).open(self.siteName, session.card.name, session.card.sha256)
            state = self._siteModel.load_current()
        except StoreError as error:
            self._siteModel, self._siteProblem = None, str(error)
            logging.warning(f"OAIMSSegment: site model not available, using the pretrained model: {error}")
            return
        if state is not None:
            session.load_state_dict(state)

    def _requireSite(self):
        self._requireSession()
        if self._session.active:
            raise SessionStateError("accept or discard the current image first")
        if self._siteModel is None:
            raise StoreError(self._siteProblem or "no site is open")
        return self._siteModel

    def siteModelInfo(self) -> dict:
        """State of the site model: site, model, version, images adapted, kept versions, store folder, problem."""
        info: dict[str, Any] = {
            "site": self.siteName,
            "model": self.card.name if self.card else None,
            "method": self._session.method if self._session else None,
            "storeFolder": self.storeFolder,
            "version": 0,
            "imagesAdapted": 0,
            "versions": [],
            "problem": self._siteProblem,
        }
        if self._siteModel is None:
            return info
        try:
            info["version"] = self._siteModel.current_version
            info["versions"] = [v.version for v in self._siteModel.versions()]
            info["imagesAdapted"] = self._imagesAdapted(info["version"])
        except StoreError as error:
            info["problem"] = str(error)
        return info

    def _imagesAdapted(self, version: int) -> Optional[int]:
        """Images behind ``version``, from the history line that created it (None if unknown, e.g. imported)."""
        if version == 0:
            return 0
        for entry in reversed(self._siteModel.history()):
            if entry.get("version") == version and entry.get("action") in ("adapt", "import"):
                return entry.get("images")
        return None

    def resetSiteModel(self) -> dict:
        """Back to the pretrained model (stored versions are kept: roll back to undo). Returns the site info."""
        self._requireSite().reset()
        self._session.reset_weights()
        return self.siteModelInfo()

    def rollbackSiteModel(self, version: int) -> dict:
        """Make an earlier ``version`` current (0 = pretrained) and use its weights. Returns the site info."""
        site = self._requireSite()
        site.rollback(int(version))
        self._session.reset_weights()
        state = site.load_current()
        if state is not None:
            self._session.load_state_dict(state)
        return self.siteModelInfo()

    def exportSiteModel(self, path: str) -> str:
        """Write the site's current weights and history to one file (to share with another site)."""
        return str(self._requireSite().export(path))

    def importSiteModel(self, path: str) -> dict:
        """Import a file written by :meth:`exportSiteModel` as this site's new current version."""
        import copy

        site = self._requireSite()
        probe = copy.deepcopy(self._session.model)
        site.import_archive(path, check=lambda state: probe.load_state_dict(state["model"]))
        self._session.load_state_dict(site.load_current())
        return self.siteModelInfo()

    # -- segments -----------------------------------------------------------------------------

    def startSegment(self, volumeNode, segmentationNode, segmentId: Optional[str] = None) -> dict[int, str]:
        """Segment ``volumeNode`` into ``segmentationNode``.

        A binary model writes into ``segmentId`` (a new segment named after the class if
        None). A multi-class model writes one segment per foreground class: ``segmentId``
        takes class 1, the others are found by class name or created. An image still open is
        accepted first (moving on means it is done). Returns ``{class index: segment ID}``.

        Raises:
            InvalidImageError: the volume does not fit the model (e.g. a scalar MRI for an RGB model).
        """
        session = self._requireSession()
        mrml.check_volume_for_model(volumeNode, session.card.image_channels, f"model '{session.card.name}'")
        if session.active and session.clicks:
            self.accept()
        elif session.active:
            self.discard()
        mrml.prepare_segmentation(segmentationNode, volumeNode)
        names = {index: name for name, index in session.card.labels.items() if index}
        classSegments = {}
        for index, name in sorted(names.items()):
            if index == 1 and segmentId:
                classSegments[index] = segmentId
            else:
                classSegments[index] = mrml.ensure_segment(segmentationNode, name)
        self._volumeNode, self._segmentationNode, self._classSegments = volumeNode, segmentationNode, classSegments
        self._location = None
        return dict(classSegments)

    # -- clicks -------------------------------------------------------------------------------

    def prepareClick(
        self,
        rasPoint,
        positive: bool = True,
        sliceOrientation: Union[str, Any] = "Axial",
        label: Optional[int] = None,
    ) -> PreparedClick:
        """Main thread: locate the click and, on a new slice, read that slice (and what the segments hold there)."""
        session = self._requireSession()
        if self._volumeNode is None:
            raise SessionStateError("choose a volume and segment first (startSegment)")
        location = mrml.locate_click(self._volumeNode, rasPoint, sliceOrientation)
        label = int(label) if label is not None else (self.activeClass if positive else 0)
        image = None
        if not location.same_slice(self._location) or not session.active:
            image = mrml.extract_slice(self._volumeNode, location)
            self._sliceBefore = {
                index: mrml.read_slice_mask(self._segmentationNode, segmentId, self._volumeNode, location)
                for index, segmentId in self._classSegments.items()
            }
            self._image = image
        # Set now, not when the worker is done: a second click queued behind this one must see it.
        self._location = location
        return PreparedClick(location, label, image)

    def computeClick(self, prepared: PreparedClick) -> ComputedClick:
        """Worker: run the engine for a click (no MRML). A click on a new slice first finishes the
        previous image (accepted: PI and a new site version)."""
        session = self._requireSession()
        previous = None
        if prepared.image is not None:
            if session.active and session.clicks:
                previous = self._computeAccept()
            elif session.active:
                session.discard()
            if self._settingsChanged:
                self._applySettings()
            session = self._session
            session.start(prepared.image)
        self._pickedMask = None
        result = session.add_click(prepared.location.position, prepared.label)
        report = {
            "latencyMs": result.latency_ms,
            "adaptMs": result.adapt_ms,
            "loss": result.loss,
            "label": prepared.label,
            "ijk": prepared.location.ijk,
            "pixel": prepared.location.position,
            "sliceAxis": "IJK"[prepared.location.axis],
            "sliceIndex": prepared.location.index,
            "newImage": prepared.image is not None,
            "clicks": len(session.clicks),
            "foregroundPixels": int((result.mask > 0).sum()),
            "previousImage": previous,
        }
        return ComputedClick(prepared, result.mask, report)

    def applyClick(self, computed: ComputedClick) -> dict:
        """Main thread: write the click's mask into the segments, on its slice only."""
        self._removeProposalSegments()
        mrml.write_slice_mask(self._segmentationNode, self._volumeNode, computed.prepared.location, computed.mask, self._classSegments)
        return computed.report

    def addClick(
        self,
        rasPoint,
        positive: bool = True,
        sliceOrientation: Union[str, Any] = "Axial",
        label: Optional[int] = None,
    ) -> dict:
        """Add a click at world RAS ``rasPoint`` in a view of ``sliceOrientation``
        (``"Axial"``, ``"Coronal"``, ``"Sagittal"`` or the view's slice node) and update the segment.

        ``positive`` adds the active class (:meth:`setActiveClass`), otherwise background;
        ``label`` sets the class index explicitly. Synchronous. Returns what happened:
        ``latencyMs``, ``adaptMs``, ``loss``, ``ijk``, ``pixel``, ``sliceAxis``, ``sliceIndex``,
        ``newImage``, ``clicks``, ``foregroundPixels`` and ``previousImage`` (the accept report of
        the image a click on another slice finished, else None).
        """
        return self.applyClick(self.computeClick(self.prepareClick(rasPoint, positive, sliceOrientation, label)))

    def computeUndo(self) -> Optional[np.ndarray]:
        """Worker: remove the last click (and its MI update); the previous mask, or None when no click is left."""
        session = self._requireSession()
        if not session.active or not session.clicks:
            raise SessionStateError("there is no click to undo")
        self._pickedMask = None
        return session.undo()

    def applyUndo(self, mask: Optional[np.ndarray]) -> dict:
        """Main thread: show the previous mask (or what the slice held before the first click)."""
        self._removeProposalSegments()
        if mask is None:
            self._restoreSlice()
        else:
            mrml.write_slice_mask(self._segmentationNode, self._volumeNode, self._location, mask, self._classSegments)
        return {"clicks": len(self._session.clicks)}

    def undoClick(self) -> dict:
        """Undo the last click. Returns ``{"clicks": clicks left}``."""
        return self.applyUndo(self.computeUndo())

    # -- accept / discard ---------------------------------------------------------------------

    def _computeAccept(self) -> dict:
        """Accept the open image in the engine (PI) and save the site version; no MRML."""
        session = self._session
        outcome = session.accept(mask=self._pickedMask)
        self._pickedMask = None
        adapted = outcome.applied or (session.mi_enabled and outcome.clicks > 1)
        report = {
            "applied": outcome.applied,
            "reason": outcome.reason,
            "latencyMs": outcome.latency_ms,
            "losses": dict(outcome.losses),
            "clicks": outcome.clicks,
            "saved": False,
            "version": None,
            "message": "",
        }
        if not adapted:
            report["message"] = "the model did not change; no new site version"
        elif self._siteModel is None:
            report["message"] = f"the site model was NOT saved: {self._siteProblem or 'no site is open'}"
        else:
            images = (self._imagesAdapted(self._siteModel.current_version) or 0) + 1
            info = {"images": images, "clicks": outcome.clicks, "method": session.method, "pi_applied": outcome.applied}
            if outcome.reason:
                info["reason"] = outcome.reason
            try:
                report["version"] = self._siteModel.save_version(session.state_dict(), info)
                report["saved"] = True
                report["message"] = f"site '{self.siteName}' is now at version {report['version']} ({images} images)"
            except StoreError as error:
                # The adapted weights stay in use for this Slicer session; only persistence failed.
                report["message"] = f"the site model was NOT saved: {error}"
                logging.warning(f"OAIMSSegment: {report['message']}")
        return report

    def computeAccept(self) -> dict:
        """Worker: accept the open image (PI, new site version)."""
        session = self._requireSession()
        if not session.active or not session.clicks:
            raise SessionStateError("nothing to accept: click in a slice first")
        report = self._computeAccept()
        if self._settingsChanged:
            self._applySettings()
        return report

    def applyAccept(self, report: dict) -> dict:
        """Main thread: the segment stays as it is; only proposal segments go."""
        self._removeProposalSegments()
        self._location = None
        return report

    def accept(self) -> dict:
        """Accept the segment on the current slice: PI adaptation, and a new site version saved.

        Returns ``applied``, ``reason``, ``latencyMs``, ``losses``, ``clicks``, ``saved``,
        ``version`` and a ``message`` for the user (saying so when saving failed).
        """
        return self.applyAccept(self.computeAccept())

    def computeDiscard(self) -> None:
        """Worker: drop the open image and every update it caused."""
        self._requireSession().discard()
        self._pickedMask = None
        if self._settingsChanged:
            self._applySettings()

    def applyDiscard(self, _: None = None) -> dict:
        """Main thread: put back what the slice held before the first click."""
        self._removeProposalSegments()
        if self._location is not None:
            self._restoreSlice()
        self._location = None
        return {}

    def discard(self) -> dict:
        """Discard the current slice's clicks: the segment and the model go back to how they were."""
        self.computeDiscard()
        return self.applyDiscard()

    def _restoreSlice(self) -> None:
        for index, segmentId in self._classSegments.items():
            before = self._sliceBefore.get(index)
            if before is not None:
                mrml.write_slice_mask(self._segmentationNode, self._volumeNode, self._location, before.astype(np.uint8), {1: segmentId})

    def _closeImage(self) -> None:
        """Discard an open image (used when the model or site changes under it)."""
        if self._session is not None and self._session.active:
            self.discard()

    # -- proposals ----------------------------------------------------------------------------

    def setProposalModel(self, nameOrPath: str) -> None:
        """Use another proposal model (shipped name or ``.pt`` path) for :meth:`proposeNextSteps`."""
        self.proposalModelName = str(nameOrPath)
        self._proposalModel = None

    def proposeNextSteps(self, k: int = 3, seed: Optional[int] = None) -> list[str]:
        """Show ``k`` proposed larger segments of the active class on the current slice, as temporary
        segments. Returns their segment IDs; :meth:`pickProposal` makes one the current mask."""
        from OAIMSSegment.proposals import load_proposal_model, propose_next_steps

        session = self._requireSession()
        if not session.active or session.mask is None:
            raise SessionStateError("click in a slice first: proposals extend the current segment")
        if self._proposalModel is None:
            self._proposalModel = load_proposal_model(self.proposalModelName)
        mask = self._pickedMask if self._pickedMask is not None else session.mask
        image2d = self._image[0] if self._image.shape[0] == 1 else np.moveaxis(self._image, 0, -1)
        decided = mask > 0
        for click in session.clicks:
            decided[click.position] = True  # a background click decides its pixel too
        self._proposals = propose_next_steps(self._proposalModel, image2d, decided, mask == self.activeClass, k=k, seed=seed)
        self._removeProposalSegments()
        segmentIds = []
        for number, proposal in enumerate(self._proposals, start=1):
            segmentId = mrml.ensure_segment(self._segmentationNode, f"{PROPOSAL_SEGMENT_PREFIX} {number}")
            mrml.write_slice_mask(
                self._segmentationNode, self._volumeNode, self._location, proposal.seg_mask.astype(np.uint8), {1: segmentId}
            )
            segmentIds.append(segmentId)
        return segmentIds

    def pickProposal(self, index: int) -> dict:
        """Make proposal ``index`` (0-based) the current mask of the active class; Accept then adapts to it."""
        if not 0 <= index < len(self._proposals):
            raise SessionStateError(f"there is no proposal {index} (have {len(self._proposals)})")
        session = self._requireSession()
        mask = (self._pickedMask if self._pickedMask is not None else session.mask).copy()
        mask[mask == self.activeClass] = 0
        mask[self._proposals[index].seg_mask] = self.activeClass
        self._pickedMask = mask
        self._removeProposalSegments()
        mrml.write_slice_mask(self._segmentationNode, self._volumeNode, self._location, mask, self._classSegments)
        return {"foregroundPixels": int((mask > 0).sum())}

    def _removeProposalSegments(self) -> None:
        if self._segmentationNode is None:
            return
        segmentation = self._segmentationNode.GetSegmentation()
        for segmentId in list(segmentation.GetSegmentIDs()):
            if segmentation.GetSegment(segmentId).GetName().startswith(PROPOSAL_SEGMENT_PREFIX):
                segmentation.RemoveSegment(segmentId)


#
# Widget
#


class OAIMSSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt front end: forwards user actions to the Logic; model work runs on one worker thread."""

    #: Show the busy indicator only when work takes longer than this (seconds).
    BUSY_DELAY_S = 1.0

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._executor = None
        self._jobs: list = []  # (future, apply, started) in submission order
        self._pointLists: dict[bool, Any] = {}
        self._placed: list = []  # (point list, control point index) per click, for undo

    def setup(self) -> None:
        import concurrent.futures

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/OAIMSSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        settings = qt.QSettings()
        self.logic = OAIMSSegmentLogic(storeFolder=settings.value("OAIMSSegment/StoreFolder") or None)
        # One persistent worker: the engine's session is not thread-safe and clicks must run in order.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="OAIMSSegment")
        self._timer = qt.QTimer()
        self._timer.setInterval(50)
        self._timer.connect("timeout()", self._poll)

        self.ui.storeFolderPathLineEdit.currentPath = self.logic.storeFolder
        self.ui.siteComboBox.addItem(DEFAULT_SITE)
        self.ui.advancedCollapsibleButton.collapsed = True
        self.ui.busyProgressBar.visible = False

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.siteComboBox.connect("currentTextChanged(QString)", self.onSiteChanged)
        self.ui.storeFolderPathLineEdit.connect("currentPathChanged(QString)", self.onStoreFolderChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.segmentSelectorWidget.connect("currentSegmentChanged(QString)", self.onInputsChanged)
        self.ui.classComboBox.connect("currentIndexChanged(int)", self.onClassChanged)
        for widget in (self.ui.miCheckBox, self.ui.piCheckBox, self.ui.clickLabelCheckBox):
            widget.connect("toggled(bool)", self.onAdaptationChanged)
        for widget in (self.ui.sigmaSpinBox, self.ui.betaSpinBox, self.ui.lrSpinBox):
            widget.connect("valueChanged(double)", self.onAdaptationChanged)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.discardButton.connect("clicked(bool)", self.onDiscard)
        self.ui.resetSiteButton.connect("clicked(bool)", self.onResetSite)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.importButton.connect("clicked(bool)", self.onImport)
        self.ui.proposeButton.connect("clicked(bool)", self.onPropose)
        self.ui.pickProposalButton.connect("clicked(bool)", self.onPickProposal)

        self.ui.modelComboBox.addItem("(select a model)", "")
        if not self.logic.missingDependencies():
            for card in self.logic.availableModels():
                self.ui.modelComboBox.addItem(f"{card.name}: {card.task}", card.name)
        else:
            self.ui.modelComboBox.addItem("Install dependencies and list models...", "__install__")
        self._updateSiteInfo()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # -- placing points -------------------------------------------------------------------

    def _pointList(self, positive: bool):
        """The markups point list of foreground (``positive``) or background clicks, created on demand."""
        node = self._pointLists.get(positive)
        if node is None or node.GetScene() is None:
            name = "OAIMS foreground" if positive else "OAIMS background"
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor((0.2, 0.9, 0.2) if positive else (0.9, 0.2, 0.2))
            node.GetDisplayNode().SetPointLabelsVisibility(False)
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
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, ras)
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        sliceNode = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0]) if crosshair else None
        sliceNode = sliceNode or mrml.closest_slice_node(slicer.mrmlScene, ras)
        if not self._ensureSegmentStarted():
            node.RemoveNthControlPoint(index)
            return
        try:
            prepared = self.logic.prepareClick(ras, positive, sliceNode or "Axial")
        except OAIMSError as error:
            node.RemoveNthControlPoint(index)
            self._showError(error)
            return
        self._placed.append((node, index))
        self._submit(self.logic.computeClick, prepared, self._showClick)

    def _ensureSegmentStarted(self) -> bool:
        volume = self.ui.inputVolumeSelector.currentNode()
        segmentation = self.ui.segmentSelectorWidget.currentNode()
        if self.logic.card is None or volume is None or segmentation is None:
            self._showError("Choose a model, an input volume and a segmentation first.")
            return False
        if self.logic.volumeNode is not volume or self.logic.segmentationNode is not segmentation:
            try:
                self.logic.startSegment(volume, segmentation, self.ui.segmentSelectorWidget.currentSegmentID() or None)
            except OAIMSError as error:
                self._showError(error)
                return False
        return True

    # -- worker ---------------------------------------------------------------------------

    def _submit(self, compute: Callable, argument: Any, apply: Callable) -> None:
        """Run ``compute(argument)`` on the worker, then ``apply(result)`` on the main thread (MRML)."""
        self._jobs.append((self._executor.submit(compute, argument), apply, time.monotonic()))
        self._setButtonsEnabled(False)
        self._timer.start()

    def _poll(self) -> None:
        while self._jobs and self._jobs[0][0].done():
            future, apply, _ = self._jobs.pop(0)
            try:
                apply(future.result())
            except Exception as error:  # shown to the user; the Logic's state is consistent
                self._showError(error)
        busy = bool(self._jobs) and time.monotonic() - self._jobs[0][2] > self.BUSY_DELAY_S
        self.ui.busyProgressBar.visible = busy
        if not self._jobs:
            self._timer.stop()
            self._setButtonsEnabled(True)
            self._updateSiteInfo()

    def _setButtonsEnabled(self, enabled: bool) -> None:
        for button in (self.ui.undoButton, self.ui.acceptButton, self.ui.discardButton, self.ui.proposeButton,
                       self.ui.pickProposalButton, self.ui.siteCollapsibleButton, self.ui.modelComboBox):
            button.enabled = enabled

    # -- results --------------------------------------------------------------------------

    def _showClick(self, computed: ComputedClick) -> None:
        report = self.logic.applyClick(computed)
        self.ui.latencyLabel.text = (
            f"{report['latencyMs']:.0f} ms (adaptation {report['adaptMs']:.0f} ms), "
            f"{report['clicks']} click(s) on slice {report['sliceAxis']}={report['sliceIndex']}"
        )
        if report["previousImage"]:
            self.ui.statusLabel.text = f"Previous slice accepted: {report['previousImage']['message']}"

    def _showAccept(self, report: dict) -> None:
        self.logic.applyAccept(report)
        self._clearPoints()
        self.ui.statusLabel.text = f"Accepted ({report['latencyMs']:.0f} ms): {report['message']}"
        if not report["saved"] and report["applied"]:
            slicer.util.warningDisplay(report["message"], windowTitle="OAIMS Segment")

    def _showError(self, error: Union[Exception, str]) -> None:
        self.ui.statusLabel.text = str(error)
        logging.error(f"OAIMSSegment: {error}")

    def _clearPoints(self) -> None:
        for node in self._pointLists.values():
            node.RemoveAllControlPoints()
        self._placed.clear()

    def _updateSiteInfo(self) -> None:
        info = self.logic.siteModelInfo()
        images = "unknown" if info["imagesAdapted"] is None else info["imagesAdapted"]
        text = f"Site '{info['site']}': version {info['version']}, images adapted: {images}"
        self.ui.siteInfoLabel.text = text + (f"\nNot saving: {info['problem']}" if info["problem"] else "")
        self.ui.rollbackSpinBox.maximum = max(info["versions"] or [0])

    # -- controls -------------------------------------------------------------------------

    def onModelChanged(self, index: int) -> None:
        name = self.ui.modelComboBox.itemData(index)
        if name == "__install__":
            self._installDependencies()
            return
        if not name:
            return
        try:
            with slicer.util.WaitCursor():
                card = self.logic.setModel(name)
        except OAIMSError as error:
            self._showError(error)
            return
        self._clearPoints()
        self.ui.classComboBox.clear()
        for className, classIndex in sorted(card.labels.items(), key=lambda item: item[1]):
            if classIndex:
                self.ui.classComboBox.addItem(className, classIndex)
        settings = self.logic.adaptationSettings()
        for spinBox, key in ((self.ui.sigmaSpinBox, "sigma"), (self.ui.betaSpinBox, "beta"), (self.ui.lrSpinBox, "lr")):
            wasBlocked = spinBox.blockSignals(True)
            spinBox.value = settings[key]
            spinBox.blockSignals(wasBlocked)
        wasBlocked = self.ui.clickLabelCheckBox.blockSignals(True)
        self.ui.clickLabelCheckBox.checked = settings["clickLabel"]
        self.ui.clickLabelCheckBox.blockSignals(wasBlocked)
        self._updateSiteInfo()

    def _installDependencies(self) -> None:
        try:
            with slicer.util.WaitCursor():
                self.logic.setupPythonRequirements(confirm=lambda message: slicer.util.confirmOkCancelDisplay(message))
        except OAIMSError as error:
            slicer.util.errorDisplay(str(error), windowTitle="OAIMS Segment")
            return
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItem("(select a model)", "")
        for card in self.logic.availableModels():
            self.ui.modelComboBox.addItem(f"{card.name}: {card.task}", card.name)

    def onSiteChanged(self, name: str) -> None:
        if name:
            self._runSiteAction(lambda: self.logic.setSite(name))

    def onStoreFolderChanged(self, path: str) -> None:
        qt.QSettings().setValue("OAIMSSegment/StoreFolder", path)
        self._runSiteAction(lambda: self.logic.setStoreFolder(path))

    def onInputsChanged(self, *_: Any) -> None:
        # The Logic starts the segment lazily at the next click (see _ensureSegmentStarted).
        self._clearPoints()

    def onClassChanged(self, index: int) -> None:
        if index >= 0 and self.logic.card is not None:
            self.logic.setActiveClass(int(self.ui.classComboBox.itemData(index)))

    def onAdaptationChanged(self, *_: Any) -> None:
        self.logic.setAdaptation(
            mi=self.ui.miCheckBox.checked,
            pi=self.ui.piCheckBox.checked,
            sigma=self.ui.sigmaSpinBox.value,
            beta=self.ui.betaSpinBox.value,
            lr=self.ui.lrSpinBox.value,
            clickLabel=self.ui.clickLabelCheckBox.checked,
        )

    def onUndo(self) -> None:
        if self._placed:
            node, index = self._placed.pop()
            if index < node.GetNumberOfControlPoints():
                node.RemoveNthControlPoint(index)
        self._submit(lambda _: self.logic.computeUndo(), None, self.logic.applyUndo)

    def onAccept(self) -> None:
        self._submit(lambda _: self.logic.computeAccept(), None, self._showAccept)

    def onDiscard(self) -> None:
        self._clearPoints()
        self._submit(lambda _: self.logic.computeDiscard(), None, self.logic.applyDiscard)

    def onPropose(self) -> None:
        try:
            self.logic.proposeNextSteps(int(self.ui.proposalCountSpinBox.value))
        except OAIMSError as error:
            self._showError(error)
            return
        self.ui.proposalIndexSpinBox.maximum = int(self.ui.proposalCountSpinBox.value)

    def onPickProposal(self) -> None:
        try:
            self.logic.pickProposal(int(self.ui.proposalIndexSpinBox.value) - 1)
        except OAIMSError as error:
            self._showError(error)

    def _runSiteAction(self, action: Callable[[], Any]) -> None:
        try:
            with slicer.util.WaitCursor():
                action()
        except OAIMSError as error:
            self._showError(error)
        self._updateSiteInfo()

    def onResetSite(self) -> None:
        if slicer.util.confirmOkCancelDisplay("Reset this site to the pretrained model? Saved versions are kept."):
            self._runSiteAction(self.logic.resetSiteModel)

    def onRollback(self) -> None:
        self._runSiteAction(lambda: self.logic.rollbackSiteModel(int(self.ui.rollbackSpinBox.value)))

    def onExport(self) -> None:
        path = qt.QFileDialog.getSaveFileName(None, "Export site model", "", "OAIMS site model (*.oaims.zip)")
        if path:
            self._runSiteAction(lambda: self.logic.exportSiteModel(path))

    def onImport(self) -> None:
        path = qt.QFileDialog.getOpenFileName(None, "Import site model", "", "OAIMS site model (*.oaims.zip)")
        if path:
            self._runSiteAction(lambda: self.logic.importSiteModel(path))


#
# Test
#


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
        if logic.missingDependencies():
            self.delayDisplay(f"Skipped: missing {', '.join(logic.missingDependencies())}")
            return
        cards = [card for card in logic.availableModels() if card.image_channels == 1]
        if not cards:
            self.delayDisplay("Skipped: no single-channel model is shipped in Resources/Models")
            return
        self.delayDisplay(f"Model {cards[0].name}")
        logic.setModel(cards[0].name)
        logic.setSite("selftest")

        # A bright ball in a 64^3 volume with anisotropic spacing and a non-trivial origin.
        k, j, i = np.mgrid[:64, :64, :64]
        voxels = (100.0 * ((k - 32) ** 2 / 0.5 + (j - 30) ** 2 + (i - 34) ** 2 < 14**2) + 10.0).astype(np.float32)
        voxels += np.random.default_rng(0).normal(0, 2, voxels.shape).astype(np.float32)
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ball")
        image = vtk.vtkImageData()
        image.SetDimensions(64, 64, 64)
        image.AllocateScalars(vtk.VTK_FLOAT, 1)
        volume.SetAndObserveImageData(image)
        volume.SetSpacing(0.9, 0.9, 2.0)
        volume.SetOrigin(-30.0, -25.0, 10.0)
        mrml.volume_array(volume)[:] = voxels
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ball segmentation")
        classSegments = logic.startSegment(volume, segmentation)

        centre = mrml.ijk_to_world(volume) @ np.array([34, 30, 32, 1.0])
        report = logic.addClick(centre[:3], positive=True, sliceOrientation="Axial")
        self.assertEqual(report["ijk"], (34, 30, 32))
        self.delayDisplay(f"Click: {report['latencyMs']:.0f} ms, {report['foregroundPixels']} px")
        location = mrml.locate_click(volume, centre[:3], "Axial")
        self.assertEqual(
            mrml.read_slice_mask(segmentation, classSegments[1], volume, location).sum(), report["foregroundPixels"]
        )
        outside = mrml.ijk_to_world(volume) @ np.array([5, 5, 32, 1.0])
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
