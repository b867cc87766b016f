"""The site workflow: one model at one site, segmenting and keeping what it learns.

A :class:`SiteSession` joins an :class:`~OAIMSSegment.session.InteractiveSession` (the model
that segments and adapts) and that model's versions at one site in a
:class:`~OAIMSSegment.store.SiteModelStore` (``<store folder>/<site>/<model name>/``). It opens
the site and loads its current version (version 0: the pretrained weights), and owns what the
Slicer Logic, ``evaluate --site-store`` and the tests do with a site:

* :meth:`~SiteSession.accept`: post-interaction adaptation (``session.accept``) and, when the
  model changed, a new site version whose history line records the images behind it, the clicks,
  the Dice before/after the update and ``based_on``, the version the update was computed on.
  When another workstation saved since, the update is carried onto the newest version
  (:func:`~OAIMSSegment.site_merge.carry_update`, under the site lock) and the session continues
  from the merged weights;
* :meth:`~SiteSession.rollback`, :meth:`~SiteSession.reset`, :meth:`~SiteSession.export`,
  :meth:`~SiteSession.import_archive` and :meth:`~SiteSession.info`.

The number of images behind a version is saved with its weights (state key ``"images"``), so it
travels with rollbacks, milestones and exported archives, and survives a lost history line; for
versions saved before that, it is read from the history line that created the version.

A site that cannot be opened (read-only or missing folder, a bad name, a current version that
does not fit the model) leaves the pretrained weights in use: segmentation goes on, and
:attr:`SiteSession.problem` says why nothing is saved. No Qt and no Slicer here.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from OAIMSSegment.errors import OAIMSError, SessionStateError, StoreError
from OAIMSSegment.model import ClickSegmenter
from OAIMSSegment.session import AcceptResult, AdaptConfig, InteractiveSession
from OAIMSSegment.site_merge import carry_update
from OAIMSSegment.store import SiteModel, SiteModelStore

__all__ = ["SiteSession", "SiteAccept", "SiteInfo", "IMAGES_KEY", "open_benchmark_site"]

_LOG = logging.getLogger(__name__)

#: State key under which a saved version records how many accepted images it was adapted on.
IMAGES_KEY = "images"


@dataclass(frozen=True)
class SiteAccept:
    """What accepting an image did to the site.

    Attributes:
        outcome: the session's post-interaction result (PI applied or why not, losses, Dice).
        adapted: the weights changed while segmenting the image (PI applied, or MI steps after
            more than one click), so a new version is due.
        saved: a new site version was written.
        version: its number (None when nothing was saved).
        images: accepted images behind the weights now in use (None: unknown).
        message: one line for the user, saying so when saving failed.
        merged_onto: the newer version (saved by another workstation) that the update was carried
            onto; None when the site had not moved on (or nothing was saved).
    """

    outcome: AcceptResult
    adapted: bool
    saved: bool
    version: int | None
    images: int | None
    message: str
    merged_onto: int | None = None


@dataclass(frozen=True)
class SiteInfo:
    """State of a site model (see :meth:`SiteSession.info`).

    Attributes:
        site, model, method, store_folder: what is open, and where.
        version: the store's current version (0: the pretrained model).
        images: accepted images behind that version (None: unknown).
        versions: the versions kept in the store, oldest first.
        problem: why nothing is saved, or why the weights in use are not the current version
            ("" when neither).
        in_use: the version whose weights the session uses (differs from ``version`` after a
            fallback from a current version that does not fit, or when another workstation saved).
    """

    site: str
    model: str
    method: str
    store_folder: str
    version: int = 0
    images: int | None = 0
    versions: list[int] = field(default_factory=list)
    problem: str = ""
    in_use: int = 0


class SiteSession:
    """An interactive session whose adaptation is kept as versions of one site's model.

    Args:
        session: the session that segments; its weights are replaced by the site's current version.
        store_folder: root folder of the site model store.
        site: site name (created, at version 0, on first use).

    Attributes:
        session: the :class:`InteractiveSession` (start, add_click, undo and discard go to it directly).
        site, store_folder: what is open.
        version: the version the session's weights came from (loaded, or last saved by this session):
            the ``based_on`` of the next update.
        images: accepted images behind the session's weights (None: unknown).
        problem: why the site is not usable ("" when it is).
        saved: versions this session saved, oldest first.
    """

    def __init__(self, session: InteractiveSession, store_folder: str | os.PathLike, site: str = "default") -> None:
        self.session = session
        self.site = site
        self.store_folder = str(store_folder)
        self.saved: list[int] = []
        self.open()

    @staticmethod
    def sites(store_folder: str | os.PathLike) -> list[str]:
        """Sites that already hold a model in ``store_folder``."""
        return SiteModelStore(store_folder).sites()

    @property
    def site_model(self) -> SiteModel | None:
        """The store's handle on this site and model (None when :attr:`problem` is set)."""
        return self._site_model

    def open(self, site: str | None = None, store_folder: str | os.PathLike | None = None) -> None:
        """(Re)open the site (``site`` and ``store_folder`` change it when given) and load its current
        version. An image still open is discarded with its updates."""
        if site is not None:
            self.site = site
        if store_folder is not None:
            self.store_folder = str(store_folder)
        card = self.session.card
        self._site_model: SiteModel | None = None
        self.problem = ""
        self.fallback = ""  # why the weights in use are not the store's current version ("" when they are)
        try:
            site_model = SiteModelStore(self.store_folder).open(self.site, card.name, card.sha256)
            self._load(site_model)
        except StoreError as error:
            self.session.reset_weights()
            self._settle(0, 0)
            self.problem = str(error)
            _LOG.warning("OAIMSSegment: site model not available, using the pretrained model: %s", error)
            return
        self._site_model = site_model

    def _load(self, site_model: SiteModel) -> None:
        """Put the store's current version into the session (the pretrained weights at version 0)."""
        self.session.reset_weights()
        self._settle(0, 0)
        state = site_model.load_current()
        if state is None:
            return
        version = int(site_model.loaded_version)
        try:
            self.session.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as error:
            # A current version this model cannot load (another architecture, foreign optimizer
            # state) must not brick the site: fall back to the newest version that loads.
            loaded = site_model.load_newest_loadable(lambda candidate: self._probe().load_state_dict(candidate))
            self.session.reset_weights()
            if loaded.state is not None:
                self.session.load_state_dict(loaded.state)
            self.fallback = (f"version {version} of site {site_model.site!r} does not fit model "
                             f"{site_model.model_name!r} ({error}); using version {loaded.version}")
            _LOG.warning("OAIMSSegment: %s", self.fallback)
            self._settle(loaded.version, _images_of(loaded.state, site_model, loaded.version) if loaded.state else 0)
            return
        self._settle(version, _images_of(state, site_model, version))

    def _settle(self, version: int, images: int | None, state: dict | None = None) -> None:
        """The session's weights are now those of ``version``: remember them, as the ``based_on``
        state that the next update is measured from (``state``: a copy of them already taken)."""
        self.version, self.images = version, images
        self._based_on_state = state if state is not None else self.session.state_dict()
        self._unsaved = 0  # accepted images in the weights that no saved version holds yet

    def _probe(self) -> InteractiveSession:
        """A spare session like this one, to check that a state loads without touching the weights in use."""
        session = self.session
        return InteractiveSession(copy.deepcopy(session.model), session.method, session.config)

    def _require_site(self) -> SiteModel:
        if self.session.active:
            raise SessionStateError("accept or discard the current image first")
        if self._site_model is None:
            raise StoreError(self.problem or "no site is open")
        return self._site_model

    # -- accepting an image ---------------------------------------------------------------------

    def accept(self, mask: np.ndarray | None = None) -> SiteAccept:
        """Accept the open image (``session.accept(mask)``, ``mask`` the accepted class map ``(H, W)``
        or None for the prediction: PI when the method has it) and, when the model changed, save a new
        site version (:meth:`save_update`)."""
        session = self.session
        outcome = session.accept(mask=mask)
        return self.save_update([outcome], outcome.applied or (session.mi_enabled and outcome.clicks > 1))

    def save_update(self, outcomes: Sequence[AcceptResult], adapted: bool) -> SiteAccept:
        """Save the session's weights as one new site version after the images (2D slices) of
        ``outcomes`` were accepted; ``adapted`` says whether the weights changed while they were
        segmented (PI applied, or MI steps). Nothing is saved when they did not.

        The update is the change since :attr:`version` (the weights loaded or last saved). Under the
        site lock, if another workstation saved since, it is carried onto the newest loadable
        version (:func:`~OAIMSSegment.site_merge.carry_update`), saved with ``based_on`` =
        :attr:`version`, ``parent`` = that version and ``merged`` true, and the session goes on
        from the merged weights. Call it with no image open.

        A save that fails (read-only or full store) keeps the adapted weights in use and says so in
        the message; nothing raises for it. The next save then carries these images' updates too.
        """
        if not outcomes:
            raise SessionStateError("nothing was accepted")
        outcome = outcomes[-1]
        if not adapted:
            return SiteAccept(outcome, False, False, None, self.images, "the model did not change; no new site version")
        # The weights in use now hold these images' updates, whether or not they can be saved.
        self.images = (self.images or 0) + len(outcomes)
        self._unsaved += len(outcomes)
        if self._site_model is None:
            message = f"the site model was NOT saved: {self.problem or 'no site is open'}"
            return SiteAccept(outcome, True, False, None, self.images, message)
        try:
            version, merged_onto = self._commit(self._site_model, outcomes)
        except StoreError as error:
            message = f"the site model was NOT saved: {error}"
            _LOG.warning("OAIMSSegment: %s", message)
            return SiteAccept(outcome, True, False, None, self.images, message)
        self.saved.append(version)
        message = f"site '{self.site}' is now at version {version} ({self.images} images)"
        if merged_onto is not None:
            message += f"; this update was added to version {merged_onto}, saved meanwhile by another workstation"
        return SiteAccept(outcome, True, True, version, self.images, message, merged_onto)

    def _commit(self, site_model: SiteModel, outcomes: Sequence[AcceptResult]) -> tuple[int, int | None]:
        """Save the session's update as one version, merged onto the newest one if the site moved on;
        returns the new version and the version merged onto (None: no merge)."""
        session = self.session
        state, images, merged_onto = session.state_dict(), self.images, None
        with site_model.transaction() as txn:
            if txn.version != self.version:
                newest = txn.load(self._probe().load_state_dict)
                if newest.version != self.version:  # else the newer versions are unusable: ours stays newest
                    merged_onto = newest.version
                    onto = newest.state if newest.state is not None else {"model": session.pretrained}
                    state = carry_update(onto, self._based_on_state, state)
                    known = _images_of(newest.state, site_model, newest.version) if newest.state is not None else 0
                    images = (known or 0) + self._unsaved
            info = _version_record(outcomes, session.method, images)
            version = txn.save({**state, IMAGES_KEY: images}, info, based_on=self.version, merged=merged_onto is not None)
        if merged_onto is not None:
            session.load_state_dict(state)  # the session's optimizer now holds state's tensors: copy again
        self._settle(version, images, state if merged_onto is None else None)
        return version, merged_onto

    def start(self, image: np.ndarray, accept_mask: np.ndarray | None = None,
              settings: tuple | None = None) -> SiteAccept | None:
        """Open a new ``image`` (``(C, H, W)`` or ``(H, W)`` raw intensities, ``session.start``): the one still open is accepted first when it has
        clicks (else dropped), and ``settings`` take effect in between (see :meth:`close`). Returns
        the accept of the previous image, if there was one."""
        previous = self.close(self.session.active and bool(self.session.clicks), accept_mask, settings)
        self.session.start(image)
        return previous

    def close(self, accept: bool, mask: np.ndarray | None = None, settings: tuple | None = None) -> SiteAccept | None:
        """Accept the open image (:meth:`accept` with ``mask``) or, with ``accept`` False, discard it
        with its updates; then ``settings``, ``(method, AdaptConfig)``, take effect
        (``session.reconfigure``: an image is adapted under one set of rules)."""
        try:
            return self.accept(mask) if accept else None
        finally:
            self.session.discard()
            if settings:
                self.session.reconfigure(*settings)

    # -- managing versions ------------------------------------------------------------------------

    def rollback(self, version: int) -> None:
        """Make an earlier ``version`` current (0 = pretrained) and use its weights."""
        site_model = self._require_site()
        site_model.rollback(int(version))
        self._load(site_model)

    def reset(self) -> None:
        """Back to the pretrained model (stored versions are kept: roll back to undo)."""
        self._require_site().reset()
        self.session.reset_weights()
        self._settle(0, 0)

    def export(self, path: str | os.PathLike) -> Path:
        """Write the site's current weights and history to one file (to share with another site)."""
        return self._require_site().export(path)

    def import_archive(self, path: str | os.PathLike) -> int:
        """Import a file written by :meth:`export` as this site's new current version and use it.

        Weights (and optimizer state) that the session could not load are refused before anything
        is committed. Returns the new version.
        """
        site_model = self._require_site()
        version = site_model.import_archive(path, check=self._probe().load_state_dict)
        self._load(site_model)
        return version

    def info(self) -> SiteInfo:
        """Site, model, method, store folder, the store's current version, images behind it, kept
        versions and the problem, if any (read from the store: another workstation may have saved)."""
        fields = dict(site=self.site, model=self.session.card.name, method=self.session.method,
                      store_folder=self.store_folder, problem=self.problem or self.fallback, in_use=self.version)
        if self._site_model is None:
            return SiteInfo(**fields)
        try:
            current = self._site_model.current_version
            versions = [v.version for v in self._site_model.versions()]
            images = self.images if current == self.version else _images_from_history(self._site_model, current)
        except StoreError as error:
            return SiteInfo(**{**fields, "problem": str(error)})
        return SiteInfo(**fields, version=current, images=images, versions=versions)



def _version_record(outcomes: Sequence[AcceptResult], method: str, images: int) -> dict:
    """The history line of a version saved after accepting ``outcomes`` (one per 2D image)."""
    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return float(np.mean(known)) if known else None

    info: dict = {"images": images, "clicks": sum(o.clicks for o in outcomes), "method": method,
                  "pi_applied": any(o.applied for o in outcomes)}
    reasons = sorted({o.reason for o in outcomes if o.reason})
    if reasons:
        info["reason"] = "; ".join(reasons)
    if len(outcomes) > 1:
        info["slices"] = len(outcomes)
    info.update(dice_before=mean([o.dice_before for o in outcomes]), dice_after=mean([o.dice_after for o in outcomes]))
    return info


def _images_of(state: dict, site_model: SiteModel, version: int) -> int | None:
    """Images behind ``version``, whose ``state`` was loaded: saved with its weights, else from the history."""
    count = state.get(IMAGES_KEY)
    known = isinstance(count, int) and not isinstance(count, bool)
    return count if known else _images_from_history(site_model, version)


def _images_from_history(site_model: SiteModel, version: int) -> int | None:
    """Images behind ``version`` from the history line that created it (sites saved before the count
    was kept with the weights); None if unknown (an imported archive, a lost line)."""
    if version == 0:
        return 0
    for entry in reversed(site_model.history()):
        if entry.get("version") == version and entry.get("action") in ("adapt", "import"):
            return entry.get("images")
    return None


def open_benchmark_site(
    args: argparse.Namespace, model: ClickSegmenter, methods: list[str], seeds: list[int], config: AdaptConfig
) -> SiteSession | None:
    """The site that ``evaluate --site-store DIR [--site NAME]`` accepts into, or None without ``--site-store``.

    The run continues from the site's current version and saves one version per image that
    adapted the model, as a workstation would. A site holds one sequence of updates, so the run
    takes exactly one method and one seed. Raises OAIMSError when the site cannot be used.
    """
    if not args.site_store:
        if args.site:
            raise OAIMSError("--site needs --site-store (the store folder that holds the site)")
        return None
    if len(methods) != 1 or len(seeds) != 1:
        raise OAIMSError(f"--site-store runs one method and one seed (got {len(methods)} method(s), {len(seeds)} seed(s))")
    try:
        session = InteractiveSession(copy.deepcopy(model), methods[0], config)
    except ValueError as error:
        raise OAIMSError(str(error)) from error
    site = SiteSession(session, args.site_store, args.site or "default")
    if site.problem:
        raise StoreError(site.problem)
    return site
