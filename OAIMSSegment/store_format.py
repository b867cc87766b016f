"""What the site model store accepts and returns: names, manifests, weights, archive members,
the version records, and its errors and warnings.

Every check here refuses with a :class:`~OAIMSSegment.errors.StoreError` (names, links, weights,
archive members) or a ``ValueError`` (a manifest, which :mod:`OAIMSSegment.store` answers by
falling back to the backup manifest).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from OAIMSSegment.errors import StoreError
from OAIMSSegment.files import is_symlink

FORMAT = 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_VERSION_KEY_RE = re.compile(r"[1-9][0-9]*")
# Names Windows reserves for devices, with or without an extension ("aux.txt" opens AUX).
_WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)
_CHUNK = 1 << 20

#: A caller's check that it can use a state (e.g. a ``load_state_dict`` dry run); raises if not.
Validator = Callable[[dict], None]


class StoreWarning(UserWarning):
    """A recoverable store problem: e.g. the current version was corrupt and an older one was used."""


class StaleVersionError(StoreError):
    """A save that expected version ``expected`` to be current found ``current``: nothing was saved."""

    def __init__(self, message: str, expected: int, current: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.current = current


@dataclass(frozen=True)
class VersionInfo:
    """One stored version of a site model (version 0, the pretrained model, has no entry).

    ``parent`` is the version the update was applied to (current when it was committed),
    ``based_on`` the version it was computed from (differs from ``parent`` when another
    workstation saved in between), ``merged`` whether the caller carried it onto ``parent``.
    ``images``: accepted images behind this version (None: unknown)."""

    version: int
    time: str
    sha256: str
    size: int
    action: str
    parent: int = 0
    base_sha256: str = ""
    based_on: int = 0
    merged: bool = False
    images: int | None = None


@dataclass(frozen=True)
class LoadedVersion:
    """What :meth:`SiteModel.load_newest_loadable` returned: ``version`` (0: the pretrained
    model, ``state`` None), its ``state``, and ``reason``: why it is not the current version
    ('' when it is)."""

    version: int
    state: dict | None
    reason: str = ""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def refuse_link(path: Path) -> None:
    """StoreError (and a StoreWarning) if ``path`` is a symbolic link: a link in a shared site
    folder could make a save write or delete files outside the store."""
    if is_symlink(path):
        message = (
            f"{path} is a symbolic link; the store never follows links inside a site folder "
            "(a save could change files elsewhere). Nothing was read or written: replace the link by "
            "the real file or folder"
        )
        warnings.warn(message, StoreWarning, stacklevel=3)
        raise StoreError(message)


def validated(state: dict, what: str, validate: Validator | None) -> None:
    """Run the caller's ``validate(state)`` (e.g. a ``load_state_dict`` dry run); any exception it
    raises becomes a StoreError naming ``what`` (plural: "the weights of version 3")."""
    if validate is None:
        return
    try:
        validate(state)
    except Exception as e:  # the validator's own failure type (RuntimeError, KeyError...) means "does not fit"
        raise StoreError(f"{what} do not fit the model: {type(e).__name__}: {e}") from e


NOT_SAVED = "; the site model was not saved, the previous version is kept"
UNCHANGED = "; nothing was changed"


def file_error(action: str, e: OSError, tail: str = NOT_SAVED) -> StoreError:
    """A StoreError for a failed file operation: what failed, why, where, and what is still safe."""
    # Name the folder rather than our random temp file name.
    where = Path(e.filename).parent if e.filename and str(e.filename).endswith(".tmp") else e.filename
    return StoreError(f"{action} failed: {e.strerror or e}{f' ({where})' if where else ''}{tail}")




def validate_name(kind: str, name: str) -> str:
    """``name`` if it is a safe folder name on every OS, else StoreError naming the rule broken."""
    if not isinstance(name, str) or not name:
        raise StoreError(f"{kind} must be a non-empty string")
    if ".." in name or not _NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid {kind} {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no path separators, no '..' and no other characters"
        )
    if name.endswith("."):
        raise StoreError(f"invalid {kind} {name!r}: Windows drops a trailing '.', so it would name another folder")
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        raise StoreError(f"invalid {kind} {name!r}: {name.split('.')[0].upper()} is a device name reserved by Windows")
    return name


def is_valid_name(name: str) -> bool:
    try:
        validate_name("name", name)
    except StoreError:
        return False
    return True


def validate_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise StoreError(f"base_sha256 must be 64 lowercase hex characters, got {sha!r}")
    return sha


def _is_int(value: Any, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


#: Manifest entry fields: name -> (required, check).
_ENTRY_FIELDS = {
    "time": (True, lambda v: isinstance(v, str)),
    "sha256": (True, lambda v: isinstance(v, str) and _SHA_RE.fullmatch(v) is not None),
    "size": (True, _is_int),
    "action": (True, lambda v: isinstance(v, str)),
    "parent": (False, _is_int),
    "based_on": (False, _is_int),
    "merged": (False, lambda v: isinstance(v, bool)),
    "milestone": (False, lambda v: isinstance(v, bool)),
    "images": (False, lambda v: v is None or _is_int(v)),
    "base_sha256": (False, lambda v: isinstance(v, str) and _SHA_RE.fullmatch(v) is not None),
}


def check_manifest(manifest: Any) -> dict:
    """``manifest`` if it is a well-formed store manifest of :data:`FORMAT`, else ValueError
    naming the first bad field (every version entry is checked, not only the current one)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"not a store manifest of format {FORMAT}")
    for key, check in (
        ("current", _is_int), ("next_version", lambda v: _is_int(v, 1)), ("versions", lambda v: isinstance(v, dict)),
        ("base_sha256", lambda v: isinstance(v, str) and _SHA_RE.fullmatch(v) is not None),
    ):
        if not check(manifest.get(key)):
            raise ValueError(f"field {key!r} is missing or invalid: {manifest.get(key)!r}")
    for key, entry in manifest["versions"].items():
        if not _VERSION_KEY_RE.fullmatch(key):
            raise ValueError(f"version key {key!r} is not a positive integer")
        if not isinstance(entry, dict):
            raise ValueError(f"version {key} is not an object")
        for field, (required, check) in _ENTRY_FIELDS.items():
            if field in entry and not check(entry[field]):
                raise ValueError(f"version {key}: field {field!r} is invalid: {entry[field]!r}")
            if required and field not in entry:
                raise ValueError(f"version {key} has no {field!r}")
        if int(key) >= manifest["next_version"]:
            raise ValueError(f"version {key} is not below next_version {manifest['next_version']}")
    current = manifest["current"]
    if current != 0 and str(current) not in manifest["versions"]:
        raise ValueError(f"current version {current} has no entry")
    return manifest


# ---------------------------------------------------------------------------- weights


def find_non_finite(obj: Any, where: str = "state") -> str | None:
    """Path of the first NaN/inf tensor or number in a nested state, or None if all are finite."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return where
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = find_non_finite(v, f"{where}[{k!r}]")
            if found:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = find_non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return None


def safe_load(data: bytes, what: str) -> dict:
    """Deserialize weights without executing pickle code; anything else is a StoreError."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError...: all mean "not safe weights"
        raise StoreError(f"{what} cannot be loaded as plain weights (weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise StoreError(f"{what} does not hold a dict of weights but {type(state).__name__}")
    bad = find_non_finite(state)
    if bad:
        raise StoreError(f"{what} contains non-finite values at {bad}")
    return state


def serialize(state: dict) -> tuple[bytes, dict]:
    """torch.save ``state`` to bytes, refusing anything that could not be loaded back safely.

    Returns the bytes and the state as loaded back from them (what a later load will see)."""
    if not isinstance(state, dict):
        raise StoreError(f"state must be a dict of tensors, got {type(state).__name__}")
    bad = find_non_finite(state)
    if bad:
        raise StoreError(f"refusing to save: non-finite values at {bad}; the previous version is kept")
    buf = io.BytesIO()
    try:
        torch.save(state, buf)
    except Exception as e:
        raise StoreError(f"state cannot be serialized: {e}") from e
    data = buf.getvalue()
    # Never write what we could not read back: custom objects would fail weights_only loading.
    return data, safe_load(data, "state")


# ---------------------------------------------------------------------------- archives


def read_member(zf: zipfile.ZipFile, name: str, limit: int) -> tuple[bytes, str]:
    """Bytes and sha256 of archive member ``name``, streamed: StoreError once it passes ``limit``.

    The header's size can lie and a small deflated member can inflate to gigabytes, so the
    member is decompressed 1 MiB at a time and reading stops at ``limit + 1`` bytes: memory
    stays within the limit plus one block, whatever the archive claims."""
    too_big = StoreError(f"archive member {name} is larger than {limit} bytes; not imported")
    if zf.getinfo(name).file_size > limit:
        raise too_big
    digest, blocks, size = hashlib.sha256(), [], 0
    with zf.open(name) as member:
        while True:
            block = member.read(min(_CHUNK, limit + 1 - size))
            if not block:
                break
            size += len(block)
            if size > limit:
                raise too_big
            digest.update(block)
            blocks.append(block)
    return b"".join(blocks), digest.hexdigest()
