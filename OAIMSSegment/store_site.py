"""One site model in the store: :class:`SiteModel` (read, save, roll back, import/export) and
:class:`SiteTransaction` (read the newest version and commit on top of it under the site lock).

The layout, the commit protocol and the consistency model are described in
:mod:`OAIMSSegment.store` and docs/STORE.md; open a site model with
:meth:`OAIMSSegment.store.SiteModelStore.open`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from OAIMSSegment import store_archive
from OAIMSSegment.errors import StoreError
from OAIMSSegment.files import atomic_write_bytes, open_nofollow, read_bytes_nofollow, sha256_bytes
from OAIMSSegment.store_format import (
    UNCHANGED, LoadedVersion, StaleVersionError, StoreWarning, Validator, VersionInfo, check_manifest, file_error,
    now, refuse_link, safe_load, serialize, validated,
)

__all__ = ["SiteModel", "SiteTransaction"]

MANIFEST = "manifest.json"
MANIFEST_BAK = "manifest.bak.json"
HISTORY = "history.jsonl"
LOCK = ".lock"
VERSIONS = "versions"

_VERSION_FILE_RE = re.compile(r"^v(\d+)(\.m)?\.pt$")
# Keys the store writes itself; letting info override them would falsify the history.
_RESERVED_INFO_KEYS = frozenset({"time", "action", "version", "parent", "based_on", "merged"})


class SiteModel:
    """The adapted versions of one model at one site; obtained from :meth:`SiteModelStore.open`.

    Every method re-reads the manifest, so several processes (Slicer instances on a shared folder)
    can hold a SiteModel for the same site. Writers serialize on an inter-process file lock; use
    :meth:`transaction` to read the newest version and commit on top of it with no other update
    slipping in between.
    """

    def __init__(
        self,
        path: Path,
        site: str,
        model_name: str,
        base_sha256: str,
        keep_last: int,
        keep_every: int,
        lock_timeout: float,
        milestone_drop: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.site = site
        self.model_name = model_name
        self.base_sha256 = base_sha256
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.lock_timeout = lock_timeout
        self.milestone_drop = tuple(milestone_drop)
        #: Version that the last :meth:`load_current` actually returned (differs from
        #: :attr:`current_version` after a fallback from a corrupt file).
        self.loaded_version: int | None = None
        self._lock = FileLock(str(path / LOCK), timeout=lock_timeout)

    def __repr__(self) -> str:
        return f"SiteModel(site={self.site!r}, model_name={self.model_name!r}, path={str(self.path)!r})"

    # ------------------------------------------------------------------ links, locking and manifest

    def _check_links(self) -> None:
        """Refuse a site folder in which a symbolic link could redirect a read or a write."""
        for path in (self.path.parent, self.path, self.path / VERSIONS, self.path / MANIFEST,
                     self.path / MANIFEST_BAK, self.path / HISTORY, self.path / LOCK):
            refuse_link(path)

    def _acquire(self, timeout: float | None = None) -> None:
        # filelock opens the lock file following links (and truncating): create it ourselves first.
        self._check_links()
        os.close(open_nofollow(self.path / LOCK, os.O_RDWR | os.O_CREAT))
        self._lock.acquire(timeout=timeout)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the site's inter-process write lock (re-entrant: save_version etc. work inside)."""
        try:
            self._acquire()
        except Timeout as e:
            raise StoreError(
                f"site {self.site!r} is locked by another process (waited {self.lock_timeout:g} s); "
                "nothing was changed, try again"
            ) from e
        except OSError as e:
            raise file_error("locking the site model store", e) from e
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[SiteTransaction]:
        """Hold the site lock and yield a :class:`SiteTransaction`: the newest version, to load
        and commit on top of, with no other process able to commit in between."""
        with self.locked():
            yield SiteTransaction(self)

    def _read_manifest(self) -> dict:
        """The committed manifest; its backup (with a warning) if it is unreadable or malformed
        (bad JSON, or any entry with a wrong key, a missing field or a field of the wrong type)."""
        self._check_links()
        errors = []
        for name in (MANIFEST, MANIFEST_BAK):
            try:
                manifest = check_manifest(json.loads(read_bytes_nofollow(self.path / name).decode("utf-8")))
            except (OSError, ValueError, RecursionError) as e:
                errors.append(f"{name}: {e}")
                continue
            if name == MANIFEST_BAK:
                self._warn(f"{MANIFEST} is unreadable ({errors[0]}); using {MANIFEST_BAK}", log=False)
            return manifest
        raise StoreError(f"site model store at {self.path} is unreadable: {'; '.join(errors)}")

    def _write_manifest(self, manifest: dict) -> None:
        data = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
        atomic_write_bytes(self.path / MANIFEST, data, make_parents=False)
        # The backup lags at most one commit behind; only used if manifest.json itself rots.
        atomic_write_bytes(self.path / MANIFEST_BAK, data, make_parents=False)

    def _version_path(self, version: int, milestone: bool = False) -> Path:
        return self.path / VERSIONS / (f"v{version:06d}.m.pt" if milestone else f"v{version:06d}.pt")

    def _entry_path(self, version: int, entry: dict) -> Path:
        return self._version_path(version, bool(entry.get("milestone")))

    def _append_history(self, entry: dict) -> None:
        """Append one JSON line (caller holds the lock).

        A torn last line (a crash mid-append) is cut off first, like the tail of a write-ahead
        log, so that it neither swallows this entry nor lingers as a corrupt line in the middle.
        """
        line = json.dumps(entry, allow_nan=False) + "\n"
        fd = open_nofollow(self.path / HISTORY, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.ftruncate(fd, os.read(fd, size).rfind(b"\n") + 1)
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _warn(self, message: str, log: bool = True, **fields: Any) -> None:
        """Warn the caller and, best effort, record the warning in the history."""
        warnings.warn(f"site {self.site!r}, model {self.model_name!r}: {message}", StoreWarning, stacklevel=3)
        if not log:
            return
        try:
            # Briefly: a reader must not wait out another workstation's whole save for a log line.
            self._acquire(timeout=1.0)
        except (Timeout, OSError, StoreError):
            return  # read-only, busy or refused store: the warnings.warn above is all we can do
        try:
            self._append_history({"time": now(), "action": "warning", "message": message, **fields})
        except OSError:
            pass
        finally:
            self._lock.release()

    # ------------------------------------------------------------------ reading

    @property
    def current_version(self) -> int:
        """The version the pointer names; 0 is the pristine pretrained model (no file)."""
        return int(self._read_manifest()["current"])

    def versions(self) -> list[VersionInfo]:
        """Committed versions still on disk, oldest first (the pretrained version 0 is not listed)."""
        manifest = self._read_manifest()
        return [
            VersionInfo(
                version=int(v),
                time=e["time"],
                sha256=e["sha256"],
                size=e["size"],
                action=e["action"],
                parent=e.get("parent", 0),
                base_sha256=e.get("base_sha256", manifest["base_sha256"]),
                based_on=e.get("based_on", e.get("parent", 0)),
                merged=e.get("merged", False),
                images=e.get("images"),
            )
            for v, e in sorted(manifest["versions"].items(), key=lambda kv: int(kv[0]))
        ]

    def images(self, version: int | None = None) -> int | None:
        """Accepted images behind ``version`` (default: the current one); 0 for the pretrained model.

        Read from the version's manifest entry, written at the commit itself, so a history line
        lost to a crash between commit and history write does not reset the count; stores written
        before the manifest kept it fall back to the history line. None if unknown."""
        manifest = self._read_manifest()
        version = int(manifest["current"]) if version is None else version
        if version == 0:
            return 0
        entry = manifest["versions"].get(str(version), {})
        if "images" in entry:
            return entry["images"]
        for line in reversed(self.history()):
            if line.get("version") == version and line.get("action") in ("adapt", "import"):
                images = line.get("images")
                return images if isinstance(images, int) and not isinstance(images, bool) and images >= 0 else None
        return None

    def history(self) -> list[dict]:
        """All history entries, oldest first. A torn last line (crash mid-append) is skipped."""
        self._check_links()
        try:
            lines = read_bytes_nofollow(self.path / HISTORY).split(b"\n")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise file_error("reading the history", e, "") from e
        entries = []
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except ValueError:
                if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                    warnings.warn(f"{self.path / HISTORY}: skipping unreadable line {i + 1}", StoreWarning, stacklevel=2)
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def _read_version(self, manifest: dict, version: int) -> tuple[bytes, dict]:
        """Bytes and state of ``version``, verified; StoreError if missing, corrupt or unsafe."""
        entry = manifest["versions"].get(str(version))
        if entry is None:
            raise StoreError(f"version {version} does not exist")
        try:
            data = read_bytes_nofollow(self._entry_path(version, entry))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"version {version} file is missing") from e
        except OSError as e:
            raise StoreError(f"version {version} cannot be read: {e}") from e
        if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
            raise StoreError(
                f"version {version} is corrupt (sha256 or size mismatch: {len(data)} bytes, expected {entry['size']})"
            )
        return data, safe_load(data, f"version {version}")

    def _load_verified(
        self, validate: Validator | None = None, or_pretrained: bool = False
    ) -> tuple[int, bytes | None, dict | None, str]:
        """(version, bytes, state, reason) of the current version or, if it is unusable (corrupt,
        or refused by ``validate``), of the newest usable earlier one, with ``reason`` saying why.
        With none left: version 0 (the pretrained model) if ``or_pretrained``, else StoreError."""
        for _ in range(3):
            manifest = self._read_manifest()
            current = int(manifest["current"])
            if current == 0:
                return 0, None, None, ""
            base = manifest["base_sha256"]
            candidates = [current] + sorted(
                (int(v) for v, e in manifest["versions"].items()
                 if int(v) < current and e.get("base_sha256", base) == base),
                reverse=True,
            )
            problems: list[str] = []
            raced = False
            for version in candidates:
                try:
                    data, state = self._read_version(manifest, version)
                    validated(state, f"the weights of version {version}", validate)
                except FileNotFoundError as e:
                    # Another process may have moved the pointer and pruned this file: start over.
                    if version == current and self._read_manifest()["current"] != current:
                        raced = True
                        break
                    problems.append(str(e))
                    continue
                except StoreError as e:
                    problems.append(str(e))
                    continue
                reason = ""
                if version != current:
                    reason = f"current version {current} is unusable ({'; '.join(problems)}); using version {version} instead"
                    self._warn(reason, version=version, current=current)
                return version, data, state, reason
            if raced:
                continue
            if or_pretrained:
                reason = f"no stored version is usable ({'; '.join(problems)}); using the pretrained model"
                self._warn(reason, version=0, current=current)
                return 0, None, None, reason
            raise StoreError(
                f"site model version {current} and all earlier versions are unusable "
                f"({'; '.join(problems)}); use reset() to go back to the pretrained model"
            )
        raise StoreError(f"site model store at {self.path} keeps changing under us; try again")

    def load_current(self) -> dict | None:
        """The current state dict, or None at version 0 (use the pretrained weights).

        The file's sha256 is checked and it is loaded with ``weights_only=True``. If it is corrupt,
        the newest intact earlier version is returned instead, with a :class:`StoreWarning` and a
        history line; :attr:`loaded_version` says which version was returned. StoreError if no
        intact version is left.
        """
        version, _, state, _ = self._load_verified()
        self.loaded_version = version
        return state

    def load_newest_loadable(self, validate: Validator | None = None) -> LoadedVersion:
        """The newest version the caller can load: the current one if it is intact and
        ``validate(state)`` accepts it (e.g. ``lambda s: model.load_state_dict(s["model"])`` on a
        spare copy of the model), else the newest earlier one that is, else the pretrained model
        (version 0). Never raises for an unusable version: ``reason`` says what was skipped and
        why (also as a StoreWarning and a history line). The pointer is not moved."""
        version, _, state, reason = self._load_verified(validate, or_pretrained=True)
        self.loaded_version = version
        return LoadedVersion(version, state, reason)

    # ------------------------------------------------------------------ writing

    def _commit(
        self, data: bytes, action: str, info: dict, based_on: int | None = None, merged: bool = False,
        expect_current: int | None = None, parent: int | None = None,
    ) -> int:
        """Write ``data`` as the next version and make it current (caller validated ``data``).

        ``parent`` defaults to the current version; ``expect_current`` refuses the commit
        (StaleVersionError) if another version became current."""
        sha = sha256_bytes(data)
        try:
            with self.locked():
                manifest = self._read_manifest()
                current = int(manifest["current"])
                if expect_current is not None and current != expect_current:
                    raise StaleVersionError(
                        f"site {self.site!r} is at version {current}, not {expect_current} as expected: "
                        "another workstation saved meanwhile; nothing was saved", expect_current, current,
                    )
                version = int(manifest["next_version"])
                parent = current if parent is None else parent
                based_on = parent if based_on is None else based_on
                if based_on >= version:
                    raise StoreError(f"based_on {based_on} is not a version of site {self.site!r}; nothing was saved")
                self._sweep(manifest)
                atomic_write_bytes(self._version_path(version), data, make_parents=False)
                committed = now()
                lineage = {"parent": parent, "based_on": based_on, "merged": bool(merged)}
                entry = {"time": committed, "sha256": sha, "size": len(data), "action": action,
                         "base_sha256": manifest["base_sha256"], **lineage}
                if info.get("images") is not None:
                    entry["images"] = info["images"]
                manifest["versions"][str(version)] = entry
                manifest["current"] = version
                manifest["next_version"] = version + 1
                pruned = self._retain(manifest) + self._make_milestones(manifest)
                self._write_manifest(manifest)  # the commit point
                for path in pruned:
                    with contextlib.suppress(OSError):
                        path.unlink()
                try:
                    self._append_history({"time": committed, "action": action, "version": version, **lineage, **info})
                except OSError as e:
                    # The version is committed: telling the caller "not saved" would be false.
                    self._warn(f"version {version} was saved but its history line was not: {e}", log=False)
                return version
        except OSError as e:
            raise file_error(f"saving the site model {self.site!r}", e) from e

    def _recent(self, manifest: dict) -> set[int]:
        """The versions kept with their full state: the last ``keep_last``, the current one and
        its parent (the version an undo of the last update returns to)."""
        versions = sorted(int(v) for v in manifest["versions"])
        current = int(manifest["current"])
        keep = set(versions[-self.keep_last:]) if self.keep_last > 0 else set()
        keep.add(current)
        if str(current) in manifest["versions"]:
            keep.add(int(manifest["versions"][str(current)].get("parent", 0)))
        return keep

    def _retain(self, manifest: dict) -> list[Path]:
        """Drop versions beyond the retention rule from ``manifest``; return their files, for
        the caller to delete after the commit.

        Kept: :meth:`_recent` and every ``keep_every``-th version.
        """
        keep = self._recent(manifest)
        if self.keep_every > 0:
            keep.update(int(v) for v in manifest["versions"] if int(v) % self.keep_every == 0)
        dropped = [int(v) for v in manifest["versions"] if int(v) not in keep]
        return [self._entry_path(v, manifest["versions"].pop(str(v))) for v in dropped]

    def _make_milestones(self, manifest: dict) -> list[Path]:
        """Rewrite the versions kept only as milestones without the ``milestone_drop`` keys
        (caller holds the lock and commits ``manifest``); return the full files to delete after
        the commit. A version that cannot be read stays as it is (its problem is reported when
        it is loaded)."""
        if not self.milestone_drop:
            return []
        recent = self._recent(manifest)
        replaced = []
        for key, entry in manifest["versions"].items():
            version = int(key)
            if version in recent or entry.get("milestone"):
                continue
            try:
                _, state = self._read_version(manifest, version)
            except (StoreError, FileNotFoundError):
                continue
            data, _ = serialize({k: v for k, v in state.items() if k not in self.milestone_drop})
            atomic_write_bytes(self._version_path(version, milestone=True), data, make_parents=False)
            replaced.append(self._entry_path(version, entry))
            entry.update(sha256=sha256_bytes(data), size=len(data), milestone=True)
        return replaced

    def _sweep(self, manifest: dict) -> None:
        """Remove leftovers of crashed writers: temp files and version files the manifest does not
        name (never committed, or replaced by a milestone).

        Safe because every writer holds the lock while its temp or uncommitted files exist, and
        :meth:`_check_links` refused a linked ``versions/``: unlinking a link inside it removes
        only the link.
        """
        committed = {self._entry_path(int(v), e).name for v, e in manifest["versions"].items()}
        for folder in (self.path, self.path / VERSIONS):
            for p in folder.iterdir():
                m = _VERSION_FILE_RE.match(p.name) if folder.name == VERSIONS else None
                if (p.name.startswith(".") and p.name.endswith(".tmp")) or (m and p.name not in committed):
                    with contextlib.suppress(OSError):
                        p.unlink()

    def save_version(
        self, state: dict, info: dict, based_on: int | None = None, merged: bool = False,
        validate: Validator | None = None, expect_current: int | None = None,
    ) -> int:
        """Save ``state`` (e.g. ``{"model": ..., "optimizer": ...}``) as a new current version.

        ``info`` is free JSON recorded in the history line (clicks, losses, effect on the accepted
        image...); ``info["images"]`` (accepted images behind this version) is also kept in the
        manifest entry (see :meth:`images`). ``based_on``: the version the update was computed
        from (default: the version it is applied to, the current one), recorded with ``merged``
        (whether the caller carried it onto the current version). ``validate(state)`` runs on the
        state as it will be loaded back and may raise to refuse it. ``expect_current``: refuse
        with :class:`StaleVersionError` if another version is current by then.

        Non-finite values, unserializable or unsafe objects, a refusing validator and any write
        failure (read-only or full folder) raise StoreError with nothing committed: the previous
        version stays current and loadable. Returns the new version number.
        """
        return self._save(state, info, based_on, merged, validate, expect_current, None)

    def _save(
        self, state: dict, info: dict, based_on: int | None, merged: bool, validate: Validator | None,
        expect_current: int | None, parent: int | None,
    ) -> int:
        info = self._check_info(info)
        if based_on is not None and (not isinstance(based_on, int) or isinstance(based_on, bool) or based_on < 0):
            raise StoreError(f"based_on must be a version number (>= 0), got {based_on!r}")
        data, loaded = serialize(state)
        validated(loaded, "the weights to save", validate)
        del loaded
        return self._commit(data, "adapt", info, based_on, merged, expect_current, parent)

    @staticmethod
    def _check_info(info: dict) -> dict:
        if not isinstance(info, dict):
            raise StoreError(f"info must be a dict, got {type(info).__name__}")
        clash = _RESERVED_INFO_KEYS.intersection(info)
        if clash:
            raise StoreError(f"info must not set {sorted(clash)}: the store records those itself")
        images = info.get("images")
        if images is not None and (not isinstance(images, int) or isinstance(images, bool) or images < 0):
            raise StoreError(f"info['images'] must be a count of images (int >= 0), got {images!r}")
        try:
            json.dumps(info, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise StoreError(f"info must be JSON with finite numbers: {e}") from e
        return info

    def _move_pointer(self, version: int, action: str) -> None:
        try:
            with self.locked():
                manifest = self._read_manifest()
                previous = int(manifest["current"])
                if version != 0:
                    entry = manifest["versions"].get(str(version))
                    if entry is None:
                        raise StoreError(
                            f"version {version} does not exist (kept: "
                            f"{sorted(int(v) for v in manifest['versions'])}, or 0 for pretrained)"
                        )
                    if entry.get("base_sha256", manifest["base_sha256"]) != manifest["base_sha256"]:
                        raise StoreError(f"version {version} was adapted from another base model")
                    try:
                        self._read_version(manifest, version)  # never point at a corrupt file
                    except FileNotFoundError as e:
                        raise StoreError(f"cannot {action} to version {version}: {e}") from e
                manifest["current"] = version
                self._write_manifest(manifest)
                self._append_history({"time": now(), "action": action, "version": version, "from": previous})
        except OSError as e:
            raise file_error(f"{action} of site model {self.site!r}", e, UNCHANGED) from e

    def rollback(self, version: int) -> None:
        """Make ``version`` current (0 = pretrained). Its file is verified first. Nothing is deleted."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise StoreError(f"version must be a non-negative integer, got {version!r}")
        self._move_pointer(version, "rollback")

    def reset(self) -> None:
        """Go back to the pretrained model. Stored versions are kept, so this can be rolled back."""
        self._move_pointer(0, "reset")

    # ------------------------------------------------------------------ archives

    # ------------------------------------------------------------------ archives

    def export(self, path: str | os.PathLike) -> Path:
        """Write the current weights and a manifest (with the history) to one zip file at ``path``."""
        return store_archive.export_archive(self, path)

    def import_archive(
        self,
        path: str | os.PathLike,
        validate: Validator | None = None,
        max_bytes: int | None = None,
        check: Validator | None = None,
    ) -> int:
        """Import an archive written by :meth:`export` as a new current version (action "import").

        Refused with StoreError, nothing committed, unless: the zip holds exactly a manifest and the
        weights (no other, absolute or ``..`` paths), the weights stream in within ``max_bytes``
        (default: about twice the largest version of this site, :func:`store_archive.import_limit`)
        and within the size the manifest declares, its model_name and base_sha256 match this site's,
        the sha256 matches, the weights load with ``weights_only=True`` and are finite, and
        ``validate(state)`` (e.g. loading model and optimizer state into spare copies) does not
        raise. ``check`` is the former name of ``validate``.
        """
        return store_archive.import_archive(self, path, validate or check, max_bytes)


class SiteTransaction:
    """The newest version of a site, read and committed on under the site lock
    (from :meth:`SiteModel.transaction`).

    No other process can commit between reading :attr:`version` and :meth:`save`, so an update
    computed on an older version (``based_on``) can be carried onto the newest one (a merge) and
    committed on top of it. :meth:`save` records ``parent``: the version whose weights the update
    was applied to (:meth:`load`'s version if it was called, else :attr:`version`).
    """

    def __init__(self, site: SiteModel) -> None:
        self.site = site
        #: The current version when the transaction began; after :meth:`save`, the saved one.
        self.version: int = site.current_version
        self.loaded: LoadedVersion | None = None

    @property
    def images(self) -> int | None:
        """Accepted images behind :attr:`version` (see :meth:`SiteModel.images`)."""
        return self.site.images(self.version)

    def load(self, validate: Validator | None = None) -> LoadedVersion:
        """The newest loadable version (see :meth:`SiteModel.load_newest_loadable`)."""
        self.loaded = self.site.load_newest_loadable(validate)
        return self.loaded

    def save(
        self, state: dict, info: dict, based_on: int | None = None, merged: bool = False,
        validate: Validator | None = None,
    ) -> int:
        """Commit ``state`` on top of :attr:`version` (see :meth:`SiteModel.save_version`)."""
        parent = self.loaded.version if self.loaded is not None else self.version
        self.version = self.site._save(state, info, based_on, merged, validate, self.version, parent)
        self.loaded = None
        return self.version


