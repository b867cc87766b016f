"""The Slicer Logic's methods that touch neither MRML nor Qt: the model's card and session, the device,
the adaptation settings, the active class and the site model's actions (a mixin of
``OAIMSSegmentLogic`` in ``OAIMSSegment.py``, which reads and writes MRML; tested through it).

Everything about the site itself (versions, accept, rollback, export) is the engine's
:class:`~OAIMSSegment.site_session.SiteSession`; this file only holds the Logic's side of it.
"""

from __future__ import annotations

from typing import Optional, Union

from OAIMSSegment import dependencies
from OAIMSSegment.errors import OAIMSError, SessionStateError

__all__ = ["ModelSiteLogic"]


class ModelSiteLogic:
    """Model, device, settings and site-model methods of the Slicer Logic. The Logic provides
    ``_site`` (SiteSession or None), ``_worked``, ``_pending``, ``siteName``, ``storeFolder``, ``mi``, ``pi``,
    ``adaptOverrides``, ``_settingsChanged``, ``activeClass``, ``modelName``, ``device``,
    ``setModel``, ``abandonSegment`` and ``setupPythonRequirements``."""

    # -- model, device -------------------------------------------------------------------------
    @staticmethod
    def availableModels() -> list[dict]:
        """Cards (JSON dicts: ``name``, ``task``, ``image_channels``, ``labels``...) of the shipped models; no torch needed."""
        return dependencies.model_cards()

    @property
    def session(self):
        """The engine's InteractiveSession (None before :meth:`setModel`); read it only while no job is pending."""
        return self._site.session if self._site is not None else None

    @property
    def card(self):
        """The current model's card (None before :meth:`setModel`)."""
        return self._site.session.card if self._site is not None else None

    def setDevice(self, name: str = "auto") -> str:
        """Compute on ``"auto"`` (CUDA, else MPS, else the CPU), ``"cpu"``, ``"cuda"`` or ``"mps"``; a model in
        use is loaded again there with the site's current version. Returns the device; raises DeviceError
        (saying what is available) for a device this PyTorch or machine lacks."""
        self.setupPythonRequirements()
        from OAIMSSegment.device import resolve_device

        self._requireIdle()
        if self._worked:
            raise SessionStateError("accept or discard the current segment first")
        self.device, overrides = str(resolve_device(name)), dict(self.adaptOverrides)
        if self.modelName is not None:
            self.setModel(self.modelName)
            self.setAdaptation(lr=overrides.get("lr"))
        return self.device

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
                      beta: Optional[float] = None, lr: Optional[float] = None, clickLabel: Optional[bool] = None,
                      stage2Localization: Optional[bool] = None) -> None:
        """Switch MI / PI, set CCG sigma, beta, the learning rate, ``clickLabel`` (our MI extension, off by
        default: docs/BENCHMARKS.md, 9.1) and ``stage2Localization`` (PI's stage 2 also given the first click, our
        change, off by default: 3.1, 3.3). Takes effect now or when the segment in progress closes."""
        if mi is not None:
            self.mi = bool(mi)
        if pi is not None:
            self.pi = bool(pi)
        for key, value in (("sigma", sigma), ("beta", beta), ("lr", lr)):
            if value is not None:
                self.adaptOverrides[key] = float(value)
        for key, flag in (("mi_click_label", clickLabel), ("stage2_localization", stage2Localization)):
            if flag is not None:
                self.adaptOverrides[key] = bool(flag)
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
        """The settings in force: ``mi``, ``pi``, ``sigma``, ``beta``, ``lr`` (the card's unless overridden), ``clickLabel``,
        ``stage2Localization``."""
        config = self._requireSession().config
        return {"mi": self.mi, "pi": self.pi, "sigma": config.sigma, "beta": config.beta, "lr": config.lr,
                "clickLabel": config.mi_click_label, "stage2Localization": config.stage2_localization}

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

