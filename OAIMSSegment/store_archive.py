"""Moving a site model between sites: one zip file with the current weights and a manifest.

An archive holds exactly ``manifest.json`` (site, model name, base model sha256, version,
weights sha256 and size, images, the exporting site's history) and ``weights.pt``. Importing
streams the weights with a size cap near the size of one version of the importing site, checks
every field, and commits only weights that load with ``weights_only=True``, are finite and pass
the caller's validator: memory stays within about twice one version.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from OAIMSSegment.errors import StoreError
from OAIMSSegment.files import atomic_write_bytes, sha256_bytes
from OAIMSSegment.store_format import Validator, file_error, now, read_member, safe_load, validated

if TYPE_CHECKING:
    from OAIMSSegment.store import SiteModel

ARCHIVE_FORMAT = 1
ARCHIVE_MANIFEST = "manifest.json"
ARCHIVE_WEIGHTS = "weights.pt"
# An archive's manifest is small JSON; anything bigger is not one of ours.
MAX_ARCHIVE_MANIFEST_BYTES = 16 * 1024 * 1024
#: Largest weights member imported into a site that has no full version yet to size the cap by
#: (a version of a shipped 6.5 MB U-Net with its Adam state is about 20 MB).
DEFAULT_MAX_IMPORT_BYTES = 256 * 1024 * 1024


def export_archive(site: SiteModel, path: str | os.PathLike) -> Path:
    """Write the current weights of ``site`` and a manifest (with the history) to one zip at ``path``."""
    version, data, _, _ = site._load_verified()
    if data is None:
        raise StoreError(f"site {site.site!r} is at the pretrained model: there is nothing to export")
    manifest = {
        "format": ARCHIVE_FORMAT,
        "site": site.site,
        "model_name": site.model_name,
        "base_sha256": site._read_manifest()["base_sha256"],
        "version": version,
        "sha256": sha256_bytes(data),
        "size": len(data),
        "images": site.images(version),
        "exported": now(),
        "history": site.history(),
    }
    out = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(ARCHIVE_MANIFEST, json.dumps(manifest, indent=1))
        zf.writestr(ARCHIVE_WEIGHTS, data)
    try:
        atomic_write_bytes(out, buf.getvalue())
    except OSError as e:
        raise file_error(f"exporting to {out}", e, "") from e
    return out


def import_limit(site_manifest: dict, max_bytes: int | None) -> int:
    """The cap on an imported weights member: ``max_bytes`` if given, else twice the largest full
    version of the site plus 1 MiB (an archive holds one version of the same model), else
    :data:`DEFAULT_MAX_IMPORT_BYTES` for a site without one."""
    if max_bytes is not None:
        return max_bytes
    sizes = [e["size"] for e in site_manifest["versions"].values() if not e.get("milestone")]
    return 2 * max(sizes) + (1 << 20) if sizes else DEFAULT_MAX_IMPORT_BYTES


def _read_archive(src: Path, limit: int) -> tuple[dict, bytes, str]:
    """(manifest, weights bytes, their sha256) of the archive at ``src``; StoreError if it is not one of ours."""
    try:
        with zipfile.ZipFile(src) as zf:
            members = {i.filename for i in zf.infolist()}
            for name in members:
                if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
                    raise StoreError(f"archive {src.name} has an unsafe path {name!r}")
            if members != {ARCHIVE_MANIFEST, ARCHIVE_WEIGHTS} or len(zf.infolist()) != 2:
                raise StoreError(
                    f"archive {src.name} must hold exactly {ARCHIVE_MANIFEST} and {ARCHIVE_WEIGHTS}, "
                    f"found {sorted(members)}"
                )
            raw_manifest, _ = read_member(zf, ARCHIVE_MANIFEST, MAX_ARCHIVE_MANIFEST_BYTES)
            try:
                manifest = json.loads(raw_manifest)
                if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
                    raise ValueError(f"not a site model archive of format {ARCHIVE_FORMAT}")
                for key in ("model_name", "base_sha256", "sha256"):
                    if not isinstance(manifest.get(key), str):
                        raise ValueError(f"{key!r} is missing or not a string")
            except (ValueError, RecursionError) as e:
                raise StoreError(f"archive {src.name} has an invalid manifest: {e}") from e
            declared = manifest.get("size")
            if isinstance(declared, int) and not isinstance(declared, bool) and 0 <= declared < limit:
                limit = declared  # more than it declares is not the archive it claims to be
            data, sha = read_member(zf, ARCHIVE_WEIGHTS, limit)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
        raise StoreError(f"cannot read archive {src}: {e}") from e
    return manifest, data, sha


def import_archive(site: SiteModel, path: str | os.PathLike, validate: Validator | None, max_bytes: int | None) -> int:
    """See :meth:`OAIMSSegment.store.SiteModel.import_archive`."""
    src = Path(path)
    site_manifest = site._read_manifest()
    manifest, data, sha = _read_archive(src, import_limit(site_manifest, max_bytes))
    base = site_manifest["base_sha256"]
    if manifest["model_name"] != site.model_name:
        raise StoreError(
            f"archive {src.name} holds weights for model {manifest['model_name']!r}, not {site.model_name!r}; not imported"
        )
    if manifest["base_sha256"] != base:
        raise StoreError(
            f"archive {src.name} was adapted from another base model (sha256 {manifest['base_sha256'][:12]}..., "
            f"this site uses {base[:12]}...); not imported"
        )
    if sha != manifest["sha256"]:
        raise StoreError(f"archive {src.name}: weights sha256 does not match its manifest (corrupt); not imported")
    state = safe_load(data, f"archive {src.name}")
    validated(state, f"the weights of archive {src.name} (not imported)", validate)
    del state
    images = manifest.get("images")
    info = {
        "source_site": manifest.get("site"),
        "source_version": manifest.get("version"),
        "source_sha256": sha,
        "images": images if isinstance(images, int) and not isinstance(images, bool) and images >= 0 else None,
    }
    return site._commit(data, "import", info)
