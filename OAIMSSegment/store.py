"""Site model store: numbered, checksummed, atomically written versions of adapted weights.

A site model is weeks of clinicians' accepted segmentations, so this module is written to
never lose it, never execute it and never return it silently corrupted.

Layout, one folder per site and model (``<root>/<site>/<model_name>/``)::

    manifest.json        the commit point: base model sha256, current version, the index of
                         versions (sha256, size, time, action, parent, based_on, merged,
                         images) and the next number
    manifest.bak.json    copy of the last committed manifest, used if manifest.json is unreadable
    history.jsonl        append-only log, one JSON object a line
    versions/v000007.pt  torch.save of the state dict of version 7 (never modified once written)
    versions/v000010.m.pt  a milestone: version 10 without its optimizer state (see below)
    .lock                inter-process lock (filelock) held by every writer

A save writes the weights to a temporary file in ``versions/``, fsyncs it, renames it into place
and fsyncs the folder; only then is the manifest replaced the same way. The manifest replace is
the single commit point, so a crash at any moment leaves the previous version current and loadable.
Weights are only ever read with ``torch.load(weights_only=True)`` after their sha256 is checked.

A version that retention keeps only as an every-``keep_every``-th milestone (no longer among the
last ``keep_last``, not current, not the current one's parent) is rewritten once without the
state keys in ``milestone_drop`` (the Adam moments: twice the size of the weights, and only
needed to continue adapting from the newest versions). The milestone is written as a new file
and committed through the manifest like a save; the full file is deleted only afterwards.

No symbolic link inside a site folder is ever followed (a shared folder must not let a save
write elsewhere); writers serialize on the lock, and :meth:`SiteModel.transaction` reads the
newest version and commits on top of it (docs/STORE.md: the consistency model).

The store is split in four modules: this one (:class:`SiteModelStore`), ``store_site``
(:class:`SiteModel`, :class:`SiteTransaction`), ``store_format`` (names, manifest schema,
weights, records) and ``store_archive`` (export and import). Import from here.

No Qt and no Slicer imports here: this is engine code, used by the CLI and the Slicer module.
"""

from __future__ import annotations

import os
from pathlib import Path

from OAIMSSegment.errors import StoreError
from OAIMSSegment.files import is_symlink
from OAIMSSegment.store_format import (
    FORMAT, UNCHANGED, LoadedVersion, StaleVersionError, StoreWarning, VersionInfo, file_error, is_valid_name, now,
    refuse_link, validate_name, validate_sha,
)
from OAIMSSegment.store_site import MANIFEST, MANIFEST_BAK, VERSIONS, SiteModel, SiteTransaction

__all__ = [
    "SiteModelStore", "SiteModel", "SiteTransaction", "VersionInfo", "LoadedVersion", "StoreWarning",
    "StaleVersionError",
]


class SiteModelStore:
    """Root folder of all site models: ``<root>/<site>/<model_name>/``.

    ``keep_last`` and ``keep_every`` set retention (see :meth:`SiteModel._retain`): at most
    ``keep_last + max_version // keep_every + 2`` version files per site model, of which all but
    ``keep_last + 2`` are milestones without the ``milestone_drop`` state keys (default: the
    optimizer state, which the newest versions keep so that adaptation resumes where it left off).
    ``lock_timeout`` bounds how long a writer waits for another process's save.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        keep_last: int = 10,
        keep_every: int = 10,
        lock_timeout: float = 60.0,
        milestone_drop: tuple[str, ...] = ("optimizer",),
    ) -> None:
        if keep_last < 1:
            raise StoreError("keep_last must be at least 1")
        if keep_every < 0:
            raise StoreError("keep_every must be >= 0 (0 keeps no periodic versions)")
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.lock_timeout = lock_timeout
        self.milestone_drop = tuple(milestone_drop)

    def sites(self) -> list[str]:
        """Names of the sites that have at least one model in the store."""
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir()
            if is_valid_name(d.name) and d.is_dir() and not is_symlink(d)
            and any((m / MANIFEST).exists() for m in d.iterdir() if m.is_dir() and not is_symlink(m))
        )

    def open(self, site: str, model_name: str, base_sha256: str, allow_base_change: bool = False) -> SiteModel:
        """Open the site model, creating it (at version 0, the pretrained model) if missing.

        If the site was created for another base model (``base_sha256`` differs) this raises
        StoreError, since adapted weights only make sense on the base they were adapted from;
        ``allow_base_change=True`` instead switches the site to the new base at version 0,
        keeping the old versions (rollback to them is refused while the base differs).
        """
        validate_name("site name", site)
        validate_name("model name", model_name)
        validate_sha(base_sha256)
        path = self.root / site / model_name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in (self.root / site, path, path / VERSIONS):
                refuse_link(folder)  # mkdir must not create folders where a link points
                folder.mkdir(exist_ok=True)
        except OSError as e:
            if not (path / MANIFEST).exists():
                raise file_error(f"creating site {site!r} in {self.root}", e, "") from e
        model = SiteModel(
            path, site, model_name, base_sha256, self.keep_last, self.keep_every, self.lock_timeout, self.milestone_drop
        )
        if (path / MANIFEST).exists() or (path / MANIFEST_BAK).exists():
            self._check_base(model, base_sha256, allow_base_change)
            return model
        try:
            with model.locked():
                if not (path / MANIFEST).exists():  # another process may have created it meanwhile
                    created = now()
                    model._write_manifest({
                        "format": FORMAT, "site": site, "model_name": model_name,
                        "base_sha256": base_sha256, "created": created,
                        "current": 0, "next_version": 1, "versions": {},
                    })
                    model._append_history({"time": created, "action": "create", "version": 0, "base_sha256": base_sha256})
        except OSError as e:
            raise file_error(f"creating site {site!r}", e, "") from e
        self._check_base(model, base_sha256, allow_base_change)
        return model

    @staticmethod
    def _check_base(model: SiteModel, base_sha256: str, allow_base_change: bool) -> None:
        stored = model._read_manifest()["base_sha256"]
        if stored == base_sha256:
            return
        if not allow_base_change:
            raise StoreError(
                f"site {model.site!r} model {model.model_name!r} was adapted from a different base model "
                f"(sha256 {stored[:12]}..., now {base_sha256[:12]}...): its weights do not apply to this one. "
                "Use the matching base model, or open with allow_base_change=True to restart this site "
                "from the new pretrained model"
            )
        try:
            with model.locked():
                manifest = model._read_manifest()
                previous = int(manifest["current"])
                manifest["base_sha256"] = base_sha256
                manifest["current"] = 0
                model._write_manifest(manifest)
                model._append_history({
                    "time": now(), "action": "base_change", "version": 0, "from": previous,
                    "old_base_sha256": stored, "base_sha256": base_sha256,
                })
        except OSError as e:
            raise file_error(f"changing the base model of site {model.site!r}", e, UNCHANGED) from e
