"""Site store hardening (issue 20): symbolic links, malformed manifests, archive size caps,
validators, names, image counts and the lineage of every version. Real files and tensors."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from OAIMSSegment.errors import StoreError
from OAIMSSegment.store import SiteModel, SiteModelStore, StaleVersionError, StoreWarning
from test_store import BASE, assert_same_state, make_state, site, store  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="creating symbolic links needs privileges on Windows")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- symbolic links


@pytest.mark.parametrize("name", ["history.jsonl", "manifest.json", "manifest.bak.json", ".lock"])
def test_linked_file_in_site_folder_is_refused_and_its_target_untouched(site: SiteModel, tmp_path: Path, name: str) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})
    target = tmp_path / "outside" / "users-file.txt"
    target.parent.mkdir()
    target.write_bytes(b"a line of someone's notes\nan unterminated last line")
    before = target.read_bytes()
    link = site.path / name
    link.unlink()
    link.symlink_to(target)
    with pytest.warns(StoreWarning, match="symbolic link"):
        with pytest.raises(StoreError, match=f"{name}.*symbolic link"):
            site.save_version(make_state(2), {})
    with pytest.warns(StoreWarning), pytest.raises(StoreError, match="symbolic link"):
        site.load_current()
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["users-file.txt"]


def test_linked_versions_folder_is_refused_and_nothing_deleted_there(site: SiteModel, tmp_path: Path) -> None:
    site.save_version(make_state(1), {})
    outside = tmp_path / "outside"
    outside.mkdir()
    # Names a sweep of versions/ would delete: an uncommitted version file and a temp file.
    (outside / "v000002.pt").write_bytes(b"someone's file")
    (outside / ".v000003.pt.abc.tmp").write_bytes(b"another")
    before = snapshot(outside)
    versions = site.path / "versions"
    (site.path / "versions-real").mkdir()
    versions.rename(site.path / "versions-real" / "old")
    versions.symlink_to(outside, target_is_directory=True)
    with pytest.warns(StoreWarning), pytest.raises(StoreError, match="versions.*symbolic link"):
        site.save_version(make_state(2), {})
    assert snapshot(outside) == before


def test_linked_site_folder_is_refused_before_anything_is_created(store: SiteModelStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    store.root.mkdir(parents=True)
    (store.root / "hospital-B").symlink_to(outside, target_is_directory=True)
    with pytest.warns(StoreWarning), pytest.raises(StoreError, match="hospital-B.*symbolic link"):
        store.open("hospital-B", "unet3d", BASE)
    assert snapshot(outside) == {"keep.txt": b"x"}
    assert store.sites() == []


def test_linked_version_file_is_not_followed(site: SiteModel, tmp_path: Path) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})
    site.save_version(make_state(2), {})
    outside = tmp_path / "planted.pt"
    outside.write_bytes(site._version_path(2).read_bytes())
    site._version_path(2).unlink()
    site._version_path(2).symlink_to(outside)
    with pytest.warns(StoreWarning, match="current version 2 is unusable"):
        assert_same_state(s1, site.load_current())
    assert site.loaded_version == 1 and outside.exists()


# ---------------------------------------------------------------------------- manifests


def _damage(manifest: dict, how: str) -> dict:
    versions = manifest["versions"]
    if how == "key x":
        versions["x"] = versions["1"]
    elif how == "no sha256":
        del versions["1"]["sha256"]
    elif how == "size is a string":
        versions["1"]["size"] = str(versions["1"]["size"])
    elif how == "parent is a float":
        versions["1"]["parent"] = 0.5
    elif how == "entry is a list":
        versions["1"] = [1, 2]
    elif how == "current has no entry":
        manifest["current"] = 7
    elif how == "next_version reuses a number":
        manifest["next_version"] = 1
    elif how == "versions is a list":
        manifest["versions"] = []
    return manifest


@pytest.mark.parametrize("how", [
    "key x", "no sha256", "size is a string", "parent is a float", "entry is a list", "current has no entry",
    "next_version reuses a number", "versions is a list",
])
def test_malformed_manifest_entry_falls_back_to_the_backup(site: SiteModel, how: str) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})
    path = site.path / "manifest.json"
    path.write_text(json.dumps(_damage(json.loads(path.read_text()), how)))
    with pytest.warns(StoreWarning, match="manifest.bak.json"):
        assert_same_state(s1, site.load_current())
    with pytest.warns(StoreWarning):
        assert site.save_version(make_state(2), {}) == 2
    assert site.current_version == 2  # the save rewrote a well-formed manifest: no warning now


def test_both_manifests_malformed_is_a_store_error(site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    for name in ("manifest.json", "manifest.bak.json"):
        path = site.path / name
        path.write_text(json.dumps(_damage(json.loads(path.read_text()), "key x")))
    with pytest.raises(StoreError, match="version key 'x'"):
        site.load_current()


# ---------------------------------------------------------------------------- archives


def _zero_bomb(path: Path, megabytes: int, manifest: dict) -> Path:
    """A zip whose weights member is ``megabytes`` MiB of zeros, deflated to a few kB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        with zf.open("weights.pt", "w") as member:
            block = bytes(1 << 20)
            for _ in range(megabytes):
                member.write(block)
    return path


def _bomb_manifest(site: SiteModel, size: int) -> dict:
    return {"format": 1, "site": "evil", "model_name": site.model_name, "base_sha256": BASE,
            "version": 1, "sha256": "0" * 64, "size": size}


def test_zip_bomb_is_refused_at_the_size_of_a_version(store: SiteModelStore, site: SiteModel, tmp_path: Path) -> None:
    site.save_version(make_state(1), {})
    version_size = site.versions()[0].size
    bomb = _zero_bomb(tmp_path / "bomb.zip", 64, _bomb_manifest(site, 64 << 20))
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match="larger than"):
            site.import_archive(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * version_size + (4 << 20), f"import of a 64 MiB bomb allocated {peak} bytes"
    assert site.current_version == 1


def _lie_about_size(path: Path, name: str, size: int) -> None:
    """Rewrite the uncompressed size of member ``name`` in the zip's local and central headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    data[local + 22: local + 26] = size.to_bytes(4, "little")
    central = data.index(b"PK\x01\x02")
    while data[central + 46: central + 46 + len(name)] != name.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24: central + 28] = size.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_archive_with_a_lying_size_is_read_only_up_to_the_cap(site: SiteModel, tmp_path: Path, monkeypatch) -> None:
    """16 MiB of zeros whose headers claim 900 bytes, with a generous ``max_bytes``: counting the
    bytes zipfile inflates shows the import stops within the declared size + 1 byte, and refuses."""
    bomb = _zero_bomb(tmp_path / "bomb.zip", 16, _bomb_manifest(site, 1000))
    _lie_about_size(bomb, "weights.pt", 900)
    inflated = []
    real_update_crc = zipfile.ZipExtFile._update_crc

    def counting(self, data):  # sees every block zipfile inflates, before its CRC check
        if self.name == "weights.pt":
            inflated.append(len(data))
        return real_update_crc(self, data)

    monkeypatch.setattr(zipfile.ZipExtFile, "_update_crc", counting)
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match="archive bomb.zip|cannot read archive"):
            site.import_archive(bomb, max_bytes=1 << 30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < sum(inflated) <= 1001
    assert peak < 2 << 20, f"reading a lying 16 MiB member allocated {peak} bytes"
    assert site.current_version == 0


# ---------------------------------------------------------------------------- validators


def _net(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv3d(3, width, 3, padding=1), torch.nn.InstanceNorm3d(width, affine=True))


def _mixed_state() -> dict:
    """Weights of the site's network with the Adam state of another one (more parameter groups)."""
    state = make_state(1)
    other = torch.nn.Sequential(_net(4), torch.nn.Conv3d(4, 2, 1))
    opt = torch.optim.Adam(other.parameters())
    other(torch.randn(1, 3, 4, 4, 4)).mean().backward()
    opt.step()
    state["optimizer"] = opt.state_dict()
    return state


def fits(state: dict) -> None:
    """What the Logic can load: the model weights and the optimizer state, into spare copies."""
    net = _net(4)
    net.load_state_dict(state["model"])
    torch.optim.Adam(net.parameters()).load_state_dict(state["optimizer"])


def test_import_whose_optimizer_state_does_not_fit_is_refused_before_commit(store: SiteModelStore, tmp_path: Path) -> None:
    source = store.open("hospital-A", "unet3d", BASE)
    source.save_version(_mixed_state(), {})
    archive = source.export(tmp_path / "a.zip")
    target = store.open("hospital-B", "unet3d", BASE)
    fits(make_state(2))  # the validator accepts a state of the right shape
    with pytest.raises(StoreError, match="weights of archive a.zip .*do not fit.*ValueError"):
        target.import_archive(archive, validate=fits)
    assert target.current_version == 0 and target.versions() == []
    assert list((target.path / "versions").iterdir()) == []


def test_save_with_a_refusing_validator_commits_nothing(site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    with pytest.raises(StoreError, match="weights to save do not fit"):
        site.save_version(_mixed_state(), {}, validate=fits)
    assert site.current_version == 1 and len(site.versions()) == 1


def test_newest_loadable_version_is_used_when_the_current_one_does_not_fit(site: SiteModel) -> None:
    s1 = make_state(1)
    site.save_version(s1, {"images": 1})
    site.save_version({"model": _net(8).state_dict(), "optimizer": s1["optimizer"]}, {"images": 2})
    site.save_version(_mixed_state(), {"images": 3})
    with pytest.warns(StoreWarning, match="using version 1"):
        loaded = site.load_newest_loadable(fits)
    assert loaded.version == 1 and site.loaded_version == 1
    assert_same_state(s1, loaded.state)
    assert "version 3" in loaded.reason and "version 2" in loaded.reason and "do not fit" in loaded.reason
    assert site.current_version == 3  # the pointer is not moved
    assert site.history()[-1]["action"] == "warning"
    current = site.load_newest_loadable()
    assert current.version == 3 and current.reason == ""


def test_no_loadable_version_falls_back_to_the_pretrained_model(site: SiteModel) -> None:
    site.save_version(_mixed_state(), {})
    with pytest.warns(StoreWarning, match="pretrained"):
        loaded = site.load_newest_loadable(fits)
    assert loaded.version == 0 and loaded.state is None and "version 1" in loaded.reason


# ---------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", [
    "site\n", "hospital-A\n", "CON", "con", "aux", "Aux.txt", "NUL.tar.gz", "prn", "COM1", "com9.log", "LPT1",
    "lpt9", "a.", "site.", "x ", "a\tb",
])
def test_trailing_newline_and_windows_reserved_names_refused(store: SiteModelStore, name: str) -> None:
    with pytest.raises(StoreError, match="invalid site name"):
        store.open(name, "unet3d", BASE)
    with pytest.raises(StoreError, match="invalid model name"):
        store.open("site", name, BASE)
    assert not store.root.exists()


@pytest.mark.parametrize("name", ["COM10", "console", "nul-site", "aux2", "a.b", "LPT0"])
def test_names_that_only_resemble_reserved_ones_are_allowed(store: SiteModelStore, name: str) -> None:
    assert store.open(name, "unet3d", BASE).current_version == 0


# ---------------------------------------------------------------------------- images and lineage


def test_images_survive_a_lost_history_line(site: SiteModel, monkeypatch) -> None:
    for images in (1, 2):
        site.save_version(make_state(images), {"images": images})
    real_open = os.open

    def history_lost(path, *args, **kwargs):  # a kill between the commit and the history write
        if Path(str(path)).name == "history.jsonl":
            raise OSError(errno.EIO, "killed", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", history_lost)
    with pytest.warns(StoreWarning, match="history line was not"):
        site.save_version(make_state(3), {"images": 3})
    monkeypatch.undo()
    assert [h.get("version") for h in site.history() if h["action"] == "adapt"] == [1, 2]
    assert site.images() == 3 and site.images(2) == 2 and site.images(0) == 0
    assert site.versions()[-1].images == 3
    with pytest.raises(StoreError, match="images"):
        site.save_version(make_state(4), {"images": -1})


def test_images_travel_with_an_export(store: SiteModelStore, site: SiteModel, tmp_path: Path) -> None:
    site.save_version(make_state(1), {"images": 12})
    other = store.open("hospital-B", "unet3d", BASE)
    assert other.import_archive(site.export(tmp_path / "a.zip")) == 1
    assert other.images() == 12


def test_based_on_parent_and_merged_are_recorded(site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    site.save_version(make_state(2), {}, based_on=0)  # computed on the pretrained model, saved on 1
    site.save_version(make_state(3), {}, based_on=1, merged=True)
    info = site.versions()
    assert [(v.parent, v.based_on, v.merged) for v in info] == [(0, 0, False), (1, 0, False), (2, 1, True)]
    lines = [h for h in site.history() if h["action"] == "adapt"]
    assert [(h["parent"], h["based_on"], h["merged"]) for h in lines] == [(0, 0, False), (1, 0, False), (2, 1, True)]
    with pytest.raises(StoreError, match="based_on 9"):
        site.save_version(make_state(4), {}, based_on=9)
    with pytest.raises(StoreError, match="must not set"):
        site.save_version(make_state(4), {"parent": 1})


def test_stale_save_is_refused(site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    site.save_version(make_state(2), {})
    with pytest.raises(StaleVersionError, match="at version 2, not 1") as raised:
        site.save_version(make_state(3), {}, based_on=1, expect_current=1)
    assert raised.value.current == 2 and site.current_version == 2


def test_transaction_reads_the_newest_and_commits_on_top(store: SiteModelStore, site: SiteModel) -> None:
    site.save_version(make_state(1), {"images": 1})
    busy = SiteModelStore(store.root, lock_timeout=0.2).open("hospital-A", "unet3d", BASE)
    with site.transaction() as txn:
        assert txn.version == 1 and txn.images == 1
        with pytest.raises(StoreError, match="locked by another process"):
            busy.save_version(make_state(5), {})  # another workstation waits for the transaction
        loaded = txn.load(fits)
        assert loaded.version == 1
        assert txn.save(make_state(2), {"images": 2}, based_on=0, merged=True) == 2
        assert txn.version == 2
    entry = site.versions()[-1]
    assert (entry.parent, entry.based_on, entry.merged, entry.images) == (1, 0, True, 2)
    assert busy.save_version(make_state(3), {}) == 3


def _transactions(root: str, n: int) -> None:
    torch.set_num_threads(1)
    site = SiteModelStore(root).open("hospital-A", "unet3d", BASE)
    for _ in range(n):
        with site.transaction() as txn:
            state = txn.load().state or {"model": {"w": torch.zeros(4)}}
            state["model"]["w"] = state["model"]["w"] + 1
            txn.save(state, {"images": (txn.images or 0) + 1})


def test_three_processes_of_transactions_lose_no_update(store: SiteModelStore, site: SiteModel) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_transactions, args=(str(store.root), 5)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        assert p.exitcode == 0
    assert site.current_version == 15 and site.images() == 15
    assert torch.equal(site.load_current()["model"]["w"], torch.full((4,), 15.0))
    assert all(v.parent == v.version - 1 == v.based_on for v in site.versions())
