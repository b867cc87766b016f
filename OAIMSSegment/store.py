"""Site model store: numbered, checksummed, atomically written versions of adapted weights.

A site model is weeks of clinicians' accepted segmentations, so this module is written to
never lose it, never execute it and never return it silently corrupted.

Layout, one folder per site and model (``<root>/<site>/<model_name>/``)::

    manifest.json        the commit point: base model sha256, current version, the index of
                         versions (sha256, size, time, action, parent) and the next number
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

No Qt and no Slicer imports here: this is engine code, used by the CLI and the Slicer module.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from OAIMSSegment.errors import StoreError
from OAIMSSegment.files import atomic_write_bytes, sha256_bytes

__all__ = ["SiteModelStore", "SiteModel", "VersionInfo", "StoreWarning"]

FORMAT = 1
ARCHIVE_FORMAT = 1
MANIFEST = "manifest.json"
MANIFEST_BAK = "manifest.bak.json"
HISTORY = "history.jsonl"
LOCK = ".lock"
VERSIONS = "versions"
ARCHIVE_MANIFEST = "manifest.json"
ARCHIVE_WEIGHTS = "weights.pt"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_FILE_RE = re.compile(r"^v(\d+)(\.m)?\.pt$")
# Keys save_version writes itself; letting info override them would falsify the history.
_RESERVED_INFO_KEYS = frozenset({"time", "action", "version"})
# An archive's manifest is small JSON; anything bigger is not one of ours.
_MAX_ARCHIVE_MANIFEST_BYTES = 16 * 1024 * 1024


class StoreWarning(UserWarning):
    """A recoverable store problem: e.g. the current version was corrupt and an older one was used."""


@dataclass(frozen=True)
class VersionInfo:
    """One stored version of a site model (version 0, the pretrained model, has no entry)."""

    version: int
    time: str
    sha256: str
    size: int
    action: str
    parent: int = 0
    base_sha256: str = ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _validate_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not name:
        raise StoreError(f"{kind} must be a non-empty string")
    if "/" in name or "\\" in name or ".." in name or not _NAME_RE.match(name):
        raise StoreError(
            f"invalid {kind} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no path separators and no '..'"
        )
    return name


def _validate_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise StoreError(f"base_sha256 must be 64 lowercase hex characters, got {sha!r}")
    return sha


def _find_non_finite(obj: Any, where: str = "state") -> str | None:
    """Path of the first NaN/inf tensor or number in a nested state, or None if all are finite."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return where
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _find_non_finite(v, f"{where}[{k!r}]")
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _find_non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _safe_load(data: bytes, what: str) -> dict:
    """Deserialize weights without executing pickle code; anything else is a StoreError."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: all mean "not safe weights"
        raise StoreError(f"{what} cannot be loaded as plain weights (weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise StoreError(f"{what} does not hold a dict of weights but {type(state).__name__}")
    bad = _find_non_finite(state)
    if bad:
        raise StoreError(f"{what} contains non-finite values at {bad}")
    return state


def _serialize(state: dict) -> bytes:
    """torch.save ``state`` to bytes, refusing anything that could not be loaded back safely."""
    if not isinstance(state, dict):
        raise StoreError(f"state must be a dict of tensors, got {type(state).__name__}")
    bad = _find_non_finite(state)
    if bad:
        raise StoreError(f"refusing to save: non-finite values at {bad}; the previous version is kept")
    buf = io.BytesIO()
    try:
        torch.save(state, buf)
    except Exception as e:
        raise StoreError(f"state cannot be serialized: {e}") from e
    data = buf.getvalue()
    # Never write what we could not read back: custom objects would fail weights_only loading.
    _safe_load(data, "state")
    return data


_NOT_SAVED = "; the site model was not saved, the previous version is kept"
_UNCHANGED = "; nothing was changed"


def _error(action: str, e: OSError, tail: str = _NOT_SAVED) -> StoreError:
    """A StoreError for a failed file operation: what failed, why, where, and what is still safe."""
    # Name the folder rather than our random temp file name.
    where = Path(e.filename).parent if e.filename and str(e.filename).endswith(".tmp") else e.filename
    return StoreError(f"{action} failed: {e.strerror or e}{f' ({where})' if where else ''}{tail}")


class SiteModel:
    """The adapted versions of one model at one site; obtained from :meth:`SiteModelStore.open`.

    Every method re-reads the manifest, so several processes (Slicer instances on a shared folder)
    can hold a SiteModel for the same site. Writers serialize on an inter-process file lock; use
    :meth:`locked` to make load-adapt-save one transaction so that no other update slips in between.
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

    # ------------------------------------------------------------------ locking and manifest

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the site's inter-process write lock (re-entrant: save_version etc. work inside)."""
        try:
            self._lock.acquire()
        except Timeout as e:
            raise StoreError(
                f"site {self.site!r} is locked by another process (waited {self.lock_timeout:g} s); "
                "nothing was changed, try again"
            ) from e
        except OSError as e:
            raise _error("locking the site model store", e) from e
        try:
            yield
        finally:
            self._lock.release()

    def _read_manifest(self) -> dict:
        """The committed manifest; its backup (with a warning) if it is unreadable or malformed."""
        errors = []
        for name in (MANIFEST, MANIFEST_BAK):
            try:
                manifest = json.loads((self.path / name).read_text(encoding="utf-8"))
                if not (
                    isinstance(manifest, dict) and manifest.get("format") == FORMAT
                    and isinstance(manifest.get("current"), int) and isinstance(manifest.get("next_version"), int)
                    and isinstance(manifest.get("versions"), dict) and isinstance(manifest.get("base_sha256"), str)
                ):
                    raise ValueError(f"not a store manifest of format {FORMAT}")
            except (OSError, ValueError) as e:
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
        path = self.path / HISTORY
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
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
            self._lock.acquire(timeout=1.0)
        except (Timeout, OSError):
            return  # read-only or busy store: the warnings.warn above is all we can do
        try:
            self._append_history({"time": _now(), "action": "warning", "message": message, **fields})
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
                size=int(e["size"]),
                action=e["action"],
                parent=int(e.get("parent", 0)),
                base_sha256=e.get("base_sha256", manifest["base_sha256"]),
            )
            for v, e in sorted(manifest["versions"].items(), key=lambda kv: int(kv[0]))
        ]

    def history(self) -> list[dict]:
        """All history entries, oldest first. A torn last line (crash mid-append) is skipped."""
        try:
            lines = (self.path / HISTORY).read_bytes().split(b"\n")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _error("reading the history", e, "") from e
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
            data = self._entry_path(version, entry).read_bytes()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"version {version} file is missing") from e
        except OSError as e:
            raise StoreError(f"version {version} cannot be read: {e}") from e
        if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
            raise StoreError(
                f"version {version} is corrupt (sha256 or size mismatch: {len(data)} bytes, expected {entry['size']})"
            )
        return data, _safe_load(data, f"version {version}")

    def _load_verified(self) -> tuple[int, bytes | None, dict | None]:
        """(version, bytes, state) of the current version, or of the newest intact earlier one."""
        for _ in range(3):
            manifest = self._read_manifest()
            current = int(manifest["current"])
            if current == 0:
                return 0, None, None
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
                if version != current:
                    self._warn(
                        f"current version {current} is unusable ({problems[0]}); "
                        f"using version {version} instead",
                        version=version,
                        current=current,
                    )
                return version, data, state
            if not raced:
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
        version, _, state = self._load_verified()
        self.loaded_version = version
        return state

    # ------------------------------------------------------------------ writing

    def _commit(self, data: bytes, action: str, info: dict) -> int:
        """Write ``data`` as the next version and make it current (caller validated ``data``)."""
        sha = sha256_bytes(data)
        try:
            with self.locked():
                manifest = self._read_manifest()
                self._sweep(manifest)
                version = int(manifest["next_version"])
                parent = int(manifest["current"])
                atomic_write_bytes(self._version_path(version), data, make_parents=False)
                now = _now()
                manifest["versions"][str(version)] = {
                    "time": now, "sha256": sha, "size": len(data), "action": action,
                    "parent": parent, "base_sha256": manifest["base_sha256"],
                }
                manifest["current"] = version
                manifest["next_version"] = version + 1
                pruned = self._retain(manifest) + self._make_milestones(manifest)
                self._write_manifest(manifest)  # the commit point
                for path in pruned:
                    with contextlib.suppress(OSError):
                        path.unlink()
                try:
                    self._append_history({"time": now, "action": action, "version": version, "parent": parent, **info})
                except OSError as e:
                    # The version is committed: telling the caller "not saved" would be false.
                    self._warn(f"version {version} was saved but its history line was not: {e}", log=False)
                return version
        except OSError as e:
            raise _error(f"saving the site model {self.site!r}", e) from e

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
            data = _serialize({k: v for k, v in state.items() if k not in self.milestone_drop})
            atomic_write_bytes(self._version_path(version, milestone=True), data, make_parents=False)
            replaced.append(self._entry_path(version, entry))
            entry.update(sha256=sha256_bytes(data), size=len(data), milestone=True)
        return replaced

    def _sweep(self, manifest: dict) -> None:
        """Remove leftovers of crashed writers: temp files and version files the manifest does not
        name (never committed, or replaced by a milestone).

        Safe because every writer holds the lock while its temp or uncommitted files exist.
        """
        committed = {self._entry_path(int(v), e).name for v, e in manifest["versions"].items()}
        for folder in (self.path, self.path / VERSIONS):
            for p in folder.iterdir():
                m = _VERSION_FILE_RE.match(p.name) if folder.name == VERSIONS else None
                if (p.name.startswith(".") and p.name.endswith(".tmp")) or (m and p.name not in committed):
                    with contextlib.suppress(OSError):
                        p.unlink()

    def save_version(self, state: dict, info: dict) -> int:
        """Save ``state`` (e.g. ``{"model": ..., "optimizer": ...}``) as a new current version.

        ``info`` is free JSON recorded in the history line (clicks, losses, effect on the accepted
        image...). Non-finite values, unserializable or unsafe objects and any write failure
        (read-only or full folder) raise StoreError with nothing committed: the previous version
        stays current and loadable. Returns the new version number.
        """
        info = self._check_info(info)
        return self._commit(_serialize(state), "adapt", info)

    @staticmethod
    def _check_info(info: dict) -> dict:
        if not isinstance(info, dict):
            raise StoreError(f"info must be a dict, got {type(info).__name__}")
        clash = _RESERVED_INFO_KEYS.intersection(info)
        if clash:
            raise StoreError(f"info must not set {sorted(clash)}: the store records those itself")
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
                self._append_history({"time": _now(), "action": action, "version": version, "from": previous})
        except OSError as e:
            raise _error(f"{action} of site model {self.site!r}", e, _UNCHANGED) from e

    def rollback(self, version: int) -> None:
        """Make ``version`` current (0 = pretrained). Its file is verified first. Nothing is deleted."""
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise StoreError(f"version must be a non-negative integer, got {version!r}")
        self._move_pointer(version, "rollback")

    def reset(self) -> None:
        """Go back to the pretrained model. Stored versions are kept, so this can be rolled back."""
        self._move_pointer(0, "reset")

    # ------------------------------------------------------------------ archives

    def export(self, path: str | os.PathLike) -> Path:
        """Write the current weights and a manifest (with the history) to one zip file at ``path``."""
        version, data, _ = self._load_verified()
        if data is None:
            raise StoreError(f"site {self.site!r} is at the pretrained model: there is nothing to export")
        manifest = {
            "format": ARCHIVE_FORMAT,
            "site": self.site,
            "model_name": self.model_name,
            "base_sha256": self._read_manifest()["base_sha256"],
            "version": version,
            "sha256": sha256_bytes(data),
            "size": len(data),
            "exported": _now(),
            "history": self.history(),
        }
        out = Path(path)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(ARCHIVE_MANIFEST, json.dumps(manifest, indent=1))
            zf.writestr(ARCHIVE_WEIGHTS, data)
        try:
            atomic_write_bytes(out, buf.getvalue())
        except OSError as e:
            raise _error(f"exporting to {out}", e, "") from e
        return out

    def import_archive(
        self,
        path: str | os.PathLike,
        check: Callable[[dict], None] | None = None,
        max_bytes: int = 4 * 1024**3,
    ) -> int:
        """Import an archive written by :meth:`export` as a new current version (action "import").

        Refused with StoreError unless: the zip holds exactly a manifest and the weights (no other,
        absolute or ``..`` paths), sizes are within ``max_bytes``, the manifest's model_name and
        base_sha256 match this site's, the sha256 matches, and the weights load with
        ``weights_only=True`` and are finite. ``check(state)``, if given, may raise to refuse
        weights that do not fit the model (e.g. a ``load_state_dict`` dry run).
        """
        src = Path(path)
        try:
            with zipfile.ZipFile(src) as zf:
                members = {i.filename: i for i in zf.infolist()}
                for name in members:
                    if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
                        raise StoreError(f"archive {src.name} has an unsafe path {name!r}")
                if set(members) != {ARCHIVE_MANIFEST, ARCHIVE_WEIGHTS}:
                    raise StoreError(
                        f"archive {src.name} must hold exactly {ARCHIVE_MANIFEST} and {ARCHIVE_WEIGHTS}, "
                        f"found {sorted(members)}"
                    )
                raw_manifest = self._read_member(zf, ARCHIVE_MANIFEST, _MAX_ARCHIVE_MANIFEST_BYTES)
                data = self._read_member(zf, ARCHIVE_WEIGHTS, max_bytes)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise StoreError(f"cannot read archive {src}: {e}") from e
        try:
            manifest = json.loads(raw_manifest)
            if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
                raise ValueError(f"not a site model archive of format {ARCHIVE_FORMAT}")
            theirs = (manifest["model_name"], manifest["base_sha256"], manifest["sha256"])
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"archive {src.name} has an invalid manifest: {e}") from e
        base = self._read_manifest()["base_sha256"]
        if theirs[0] != self.model_name:
            raise StoreError(
                f"archive {src.name} holds weights for model {theirs[0]!r}, not {self.model_name!r}; not imported"
            )
        if theirs[1] != base:
            raise StoreError(
                f"archive {src.name} was adapted from another base model (sha256 {str(theirs[1])[:12]}..., "
                f"this site uses {base[:12]}...); not imported"
            )
        if sha256_bytes(data) != theirs[2]:
            raise StoreError(f"archive {src.name}: weights sha256 does not match its manifest (corrupt); not imported")
        state = _safe_load(data, f"archive {src.name}")
        if check is not None:
            try:
                check(state)
            except Exception as e:
                raise StoreError(f"archive {src.name}: weights do not fit model {self.model_name!r}: {e}") from e
        info = {
            "source_site": manifest.get("site"),
            "source_version": manifest.get("version"),
            "source_sha256": theirs[2],
        }
        return self._commit(data, "import", info)

    @staticmethod
    def _read_member(zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
        # The header's size can lie (zip bombs): read at most limit + 1 bytes and check.
        if zf.getinfo(name).file_size > limit:
            raise StoreError(f"archive member {name} is larger than {limit} bytes")
        with zf.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StoreError(f"archive member {name} is larger than {limit} bytes")
        return data


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
            if d.is_dir() and _NAME_RE.match(d.name) and any((m / MANIFEST).exists() for m in d.iterdir() if m.is_dir())
        )

    def open(self, site: str, model_name: str, base_sha256: str, allow_base_change: bool = False) -> SiteModel:
        """Open the site model, creating it (at version 0, the pretrained model) if missing.

        If the site was created for another base model (``base_sha256`` differs) this raises
        StoreError, since adapted weights only make sense on the base they were adapted from;
        ``allow_base_change=True`` instead switches the site to the new base at version 0,
        keeping the old versions (rollback to them is refused while the base differs).
        """
        _validate_name("site name", site)
        _validate_name("model name", model_name)
        _validate_sha(base_sha256)
        path = self.root / site / model_name
        try:
            (path / VERSIONS).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if not (path / MANIFEST).exists():
                raise _error(f"creating site {site!r} in {self.root}", e, "") from e
        model = SiteModel(
            path, site, model_name, base_sha256, self.keep_last, self.keep_every, self.lock_timeout, self.milestone_drop
        )
        if (path / MANIFEST).exists() or (path / MANIFEST_BAK).exists():
            self._check_base(model, base_sha256, allow_base_change)
            return model
        try:
            with model.locked():
                if not (path / MANIFEST).exists():  # another process may have created it meanwhile
                    now = _now()
                    model._write_manifest({
                        "format": FORMAT, "site": site, "model_name": model_name,
                        "base_sha256": base_sha256, "created": now,
                        "current": 0, "next_version": 1, "versions": {},
                    })
                    model._append_history({"time": now, "action": "create", "version": 0, "base_sha256": base_sha256})
        except OSError as e:
            raise _error(f"creating site {site!r}", e, "") from e
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
                    "time": _now(), "action": "base_change", "version": 0, "from": previous,
                    "old_base_sha256": stored, "base_sha256": base_sha256,
                })
        except OSError as e:
            raise _error(f"changing the base model of site {model.site!r}", e, _UNCHANGED) from e
