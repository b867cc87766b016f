"""Tests of the site model store: real files in tmp_path, real tensors, faults injected at the OS."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from OAIMSSegment.errors import StoreError
from OAIMSSegment.store import SiteModel, SiteModelStore, StoreWarning, VersionInfo

BASE = hashlib.sha256(b"pretrained unet").hexdigest()
OTHER_BASE = hashlib.sha256(b"another pretrained unet").hexdigest()


def make_state(seed: int) -> dict:
    """A real model + optimizer state dict (tiny 3D conv net, one Adam step)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3, padding=1), torch.nn.InstanceNorm3d(4, affine=True))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(1, 3, 6, 6, 6)).mean().backward()
    opt.step()
    return {"model": net.state_dict(), "optimizer": opt.state_dict()}


def assert_same_state(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b


@pytest.fixture
def store(tmp_path: Path) -> SiteModelStore:
    return SiteModelStore(tmp_path / "store", keep_last=3, keep_every=5)


@pytest.fixture
def site(store: SiteModelStore) -> SiteModel:
    return store.open("hospital-A", "unet3d", BASE)


def leftovers(site: SiteModel) -> list[str]:
    """Temp files anywhere in the site folder."""
    return [p.name for p in site.path.rglob("*.tmp")]


class Evil:
    """Unpickling this runs ``open(marker, "w")``: stands in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def save_crashing_before_the_pointer_moves(site: SiteModel, state: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """``save_version`` with ``os.replace`` failing only for manifest.json: every other file is
    written and renamed into place, but nothing is committed."""
    real_replace = os.replace

    def crash_on_pointer(src: object, dst: object) -> None:
        if Path(dst).name == "manifest.json":
            raise OSError(errno.EIO, "simulated crash before the pointer moves", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_pointer)
    with pytest.raises(StoreError):
        site.save_version(state, {})
    monkeypatch.undo()


def plant_version_file(site: SiteModel, version: int, data: bytes) -> None:
    """Overwrite a committed version file and fix its checksum, as an attacker with write access could."""
    site._version_path(version).write_bytes(data)
    manifest = json.loads((site.path / "manifest.json").read_text())
    manifest["versions"][str(version)].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (site.path / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------- basics


def test_round_trip(store: SiteModelStore, site: SiteModel) -> None:
    assert site.current_version == 0
    assert site.load_current() is None and site.loaded_version == 0
    s1, s2 = make_state(1), make_state(2)
    assert site.save_version(s1, {"clicks": 3, "loss": 0.5}) == 1
    assert site.save_version(s2, {"clicks": 5, "loss": 0.25, "dice_before": 0.8, "dice_after": 0.9}) == 2
    assert site.current_version == 2
    loaded = site.load_current()
    assert_same_state(s2, loaded)
    assert site.loaded_version == 2
    # A fresh handle (another process) sees the same.
    again = SiteModelStore(store.root).open("hospital-A", "unet3d", BASE)
    assert_same_state(s2, again.load_current())
    infos = site.versions()
    assert [v.version for v in infos] == [1, 2] and all(isinstance(v, VersionInfo) for v in infos)
    data = site._version_path(2).read_bytes()
    assert infos[1].sha256 == hashlib.sha256(data).hexdigest() and infos[1].size == len(data)
    assert infos[1].action == "adapt" and infos[1].parent == 1
    adapt = [h for h in site.history() if h["action"] == "adapt"]
    assert [(h["version"], h["clicks"]) for h in adapt] == [(1, 3), (2, 5)]
    assert adapt[1]["dice_after"] == 0.9 and "time" in adapt[1]
    assert store.sites() == ["hospital-A"]
    assert leftovers(site) == []


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", "..", "../etc", "x..y", ".hidden", "a b", "x" * 65, "é"])
def test_invalid_names_refused(store: SiteModelStore, name: str) -> None:
    with pytest.raises(StoreError):
        store.open(name, "unet3d", BASE)
    with pytest.raises(StoreError):
        store.open("site", name, BASE)
    assert not store.root.exists()


def test_invalid_base_sha_refused(store: SiteModelStore) -> None:
    with pytest.raises(StoreError, match="base_sha256"):
        store.open("site", "unet3d", "not-a-sha")


def test_base_model_mismatch(store: SiteModelStore, site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    with pytest.raises(StoreError, match="different base model"):
        store.open("hospital-A", "unet3d", OTHER_BASE)
    assert site.current_version == 1  # refusing changed nothing
    switched = store.open("hospital-A", "unet3d", OTHER_BASE, allow_base_change=True)
    assert switched.current_version == 0 and switched.load_current() is None
    assert switched.history()[-1]["action"] == "base_change"
    with pytest.raises(StoreError, match="another base model"):
        switched.rollback(1)


def test_info_validated(site: SiteModel) -> None:
    for info in ({"version": 7}, {"loss": float("nan")}, {"obj": object()}):
        with pytest.raises(StoreError):
            site.save_version(make_state(1), info)
    assert site.versions() == []


# ---------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_current_falls_back_with_warning(site: SiteModel, damage: str) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})
    site.save_version(make_state(2), {})
    path = site._version_path(2)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    else:
        path.unlink()
    with pytest.warns(StoreWarning, match="current version 2 is unusable"):
        loaded = site.load_current()
    assert_same_state(s1, loaded)
    assert site.loaded_version == 1 and site.current_version == 2
    last = site.history()[-1]
    assert last["action"] == "warning" and last["version"] == 1 and last["current"] == 2


def test_all_versions_corrupt_is_an_error_not_garbage(site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    site._version_path(1).write_bytes(b"\0" * 100)
    with pytest.raises(StoreError, match="reset"):
        site.load_current()
    site.reset()
    assert site.load_current() is None


def test_corrupt_manifest_uses_backup(site: SiteModel) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})
    (site.path / "manifest.json").write_text('{"format": 1, "curr')
    with pytest.warns(StoreWarning, match="manifest.bak.json"):
        assert_same_state(s1, site.load_current())


def test_history_tolerates_torn_last_line(site: SiteModel) -> None:
    site.save_version(make_state(1), {"clicks": 1})
    with open(site.path / "history.jsonl", "a") as f:
        f.write('{"time": "2026-11-25", "action": "ad')  # crash mid-append
    assert [h["action"] for h in site.history()] == ["create", "adapt"]
    site.save_version(make_state(2), {"clicks": 2})
    assert [h.get("clicks") for h in site.history()] == [None, 1, 2]
    assert (site.path / "history.jsonl").read_text().count("\n") == 3  # the torn tail was cut off


# ---------------------------------------------------------------------------- fault injection


def test_failure_between_write_and_rename_keeps_previous(site: SiteModel, monkeypatch: pytest.MonkeyPatch) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash before rename", str(dst))

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="previous version is kept"):
        site.save_version(make_state(2), {})
    monkeypatch.undo()
    assert not site._version_path(2).exists()  # no half-written final file
    assert leftovers(site) == []
    assert site.current_version == 1
    assert_same_state(s1, site.load_current())
    assert [h["action"] for h in site.history()] == ["create", "adapt"]
    assert site.save_version(make_state(3), {}) == 2  # and the store still works


def test_failure_after_fsync_before_pointer_moves(site: SiteModel, monkeypatch: pytest.MonkeyPatch) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})
    save_crashing_before_the_pointer_moves(site, make_state(2), monkeypatch)
    assert site._version_path(2).exists()  # weights were fully written and fsynced...
    assert site.current_version == 1  # ...but never committed
    assert [v.version for v in site.versions()] == [1]
    assert_same_state(s1, site.load_current())
    s3 = make_state(3)
    assert site.save_version(s3, {}) == 2  # the uncommitted file is replaced, not trusted
    assert_same_state(s3, site.load_current())


def test_disk_full_keeps_previous(site: SiteModel, monkeypatch: pytest.MonkeyPatch) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match="No space left on device"):
        site.save_version(make_state(2), {})
    monkeypatch.undo()
    assert leftovers(site) == [] and not site._version_path(2).exists()
    assert_same_state(s1, site.load_current())


_READ_ONLY_CHECK = """
import sys, torch
from OAIMSSegment.errors import StoreError
from OAIMSSegment.store import SiteModelStore
site = SiteModelStore(sys.argv[1]).open("hospital-A", "unet3d", sys.argv[2])
try:
    site.save_version({"model": {"w": torch.zeros(3)}}, {})
except StoreError as e:
    print("REFUSED:", e)
print("CURRENT:", site.current_version, site.load_current()["model"]["w"].tolist())
"""


def test_read_only_folder(store: SiteModelStore, site: SiteModel) -> None:
    site.save_version({"model": {"w": torch.ones(3)}}, {})
    folders = [site.path, site.path / "versions"]
    cmd = [sys.executable, "-c", _READ_ONLY_CHECK, str(store.root), BASE]
    if os.name == "posix" and os.geteuid() == 0:
        # Root ignores permission bits; without capabilities it obeys them like a clinician's account.
        if not shutil.which("setpriv"):
            pytest.skip("running as root and setpriv is missing: chmod has no effect")
        cmd = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *cmd]
    for d in folders:
        d.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        for d in folders:
            d.chmod(stat.S_IRWXU)
    assert out.returncode == 0, out.stderr
    assert "REFUSED:" in out.stdout and "Permission denied" in out.stdout
    assert "the site model was not saved, the previous version is kept" in out.stdout
    assert "CURRENT: 1 [1.0, 1.0, 1.0]" in out.stdout
    assert leftovers(site) == [] and site.current_version == 1


# ---------------------------------------------------------------------------- unsafe and invalid content


def test_pickle_payload_is_never_executed(site: SiteModel, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil(marker)}, evil)
    site.save_version(make_state(1), {})
    plant_version_file(site, 1, evil.read_bytes())  # checksum matches: only weights_only stands guard
    with pytest.raises(StoreError, match="weights_only"):
        site.load_current()
    assert not marker.exists()
    # Saving such an object is refused up front as well.
    with pytest.raises(StoreError):
        site.save_version({"model": Evil(marker)}, {})
    assert not marker.exists()


@pytest.mark.parametrize(
    "state",
    [
        {"model": {"w": torch.tensor([1.0, float("nan")])}},
        {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}},
        {"model": {"w": torch.ones(2)}, "optimizer": {"param_groups": [{"lr": float("nan")}]}},
    ],
)
def test_non_finite_state_refused(site: SiteModel, state: dict) -> None:
    s1 = make_state(1)
    site.save_version(s1, {})
    with pytest.raises(StoreError, match="non-finite"):
        site.save_version(state, {})
    assert [v.version for v in site.versions()] == [1]
    assert sorted(p.name for p in (site.path / "versions").iterdir()) == ["v000001.pt"]
    assert_same_state(s1, site.load_current())


# ---------------------------------------------------------------------------- retention, rollback, reset


def test_retention_bound(store: SiteModelStore, site: SiteModel) -> None:
    state = {"model": {"w": torch.zeros(8)}}
    for _ in range(23):
        site.save_version(state, {})
    kept = [v.version for v in site.versions()]
    assert kept == [5, 10, 15, 20, 21, 22, 23]  # every 5th + last 3
    files = sorted(p.name for p in (site.path / "versions").iterdir())
    assert files == [f"v{v:06d}.m.pt" for v in (5, 10, 15, 20)] + [f"v{v:06d}.pt" for v in (21, 22, 23)]
    assert len(kept) <= store.keep_last + 23 // store.keep_every + 2
    assert len([h for h in site.history() if h["action"] == "adapt"]) == 23  # history is never pruned


def test_milestones_drop_the_optimizer_state_and_keep_the_weights(site: SiteModel) -> None:
    states = [make_state(seed) for seed in range(12)]
    for state in states:
        site.save_version(state, {})
    entries = {v.version: v for v in site.versions()}
    assert sorted(entries) == [5, 10, 11, 12]  # 10 is among the last 3, so it keeps its optimizer
    assert entries[5].size < entries[11].size / 2  # Adam's two moments are twice the weights
    site.rollback(5)
    milestone = site.load_current()
    assert set(milestone) == {"model"}
    assert_same_state(states[4]["model"], milestone["model"])
    site.rollback(10)
    assert_same_state(states[9], site.load_current())
    for seed in range(12, 16):  # 10 leaves the last three only after the pointer moves on
        site.save_version(make_state(seed), {})
    site.rollback(10)
    assert set(site.load_current()) == {"model"}


def test_failed_milestone_commit_keeps_the_full_version(site: SiteModel, monkeypatch: pytest.MonkeyPatch) -> None:
    states = [make_state(seed) for seed in range(8)]
    for state in states[:7]:
        site.save_version(state, {})
    save_crashing_before_the_pointer_moves(site, states[7], monkeypatch)  # would make version 5 a milestone
    assert site._version_path(5).exists() and site._version_path(5, milestone=True).exists()
    site.rollback(5)
    assert_same_state(states[4], site.load_current())  # the committed full file, still intact
    site.rollback(7)
    site.save_version(states[7], {})
    assert not site._version_path(5).exists()  # replaced by the committed milestone...
    site.rollback(5)
    assert_same_state(states[4]["model"], site.load_current()["model"])  # ...with the same weights


def test_retention_keeps_rollback_target(site: SiteModel) -> None:
    state = {"model": {"w": torch.zeros(8)}}
    for _ in range(4):
        site.save_version(state, {})
    assert [v.version for v in site.versions()] == [2, 3, 4]
    site.rollback(2)
    site.save_version(state, {})  # v5 builds on v2: v2 stays although it is not among the last 3
    assert [v.version for v in site.versions()] == [2, 3, 4, 5]
    assert site.versions()[-1].parent == 2
    site.save_version(state, {})
    assert [v.version for v in site.versions()] == [4, 5, 6]


def test_rollback_and_reset(site: SiteModel) -> None:
    s1, s2 = make_state(1), make_state(2)
    site.save_version(s1, {})
    site.save_version(s2, {})
    site.rollback(1)
    assert site.current_version == 1
    assert_same_state(s1, site.load_current())
    with pytest.raises(StoreError, match="does not exist"):
        site.rollback(99)
    with pytest.raises(StoreError):
        site.rollback(-1)
    site.reset()
    assert site.current_version == 0 and site.load_current() is None
    assert site._version_path(2).exists()  # reset keeps files: it can be undone
    site.rollback(2)
    assert_same_state(s2, site.load_current())
    site.rollback(0)
    assert site.load_current() is None
    actions = [(h["action"], h["version"]) for h in site.history()]
    assert actions[-4:] == [("rollback", 1), ("reset", 0), ("rollback", 2), ("rollback", 0)]
    assert site.save_version(make_state(3), {}) == 3  # numbers are never reused


def test_rollback_to_corrupt_version_refused(site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    site.save_version(make_state(2), {})
    site._version_path(1).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupt"):
        site.rollback(1)
    assert site.current_version == 2


# ---------------------------------------------------------------------------- export / import


def test_export_import(store: SiteModelStore, site: SiteModel, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="nothing to export"):
        site.export(tmp_path / "empty.zip")
    s1 = make_state(1)
    site.save_version(s1, {"clicks": 4})
    archive = site.export(tmp_path / "site-A.zip")
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["manifest.json", "weights.pt"]
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["model_name"] == "unet3d" and manifest["base_sha256"] == BASE and manifest["version"] == 1
    assert [h["action"] for h in manifest["history"]] == ["create", "adapt"]

    other = store.open("hospital-B", "unet3d", BASE)
    other.save_version(make_state(9), {})
    assert other.import_archive(archive) == 2
    assert_same_state(s1, other.load_current())
    last = other.history()[-1]
    assert last["action"] == "import" and last["source_site"] == "hospital-A" and last["source_version"] == 1
    assert other.versions()[-1].action == "import"

    with pytest.raises(StoreError, match="model 'unet3d', not 'segresnet'"):
        store.open("hospital-B", "segresnet", BASE).import_archive(archive)
    with pytest.raises(StoreError, match="another base model"):
        store.open("hospital-C", "unet3d", OTHER_BASE).import_archive(archive)
    with pytest.raises(StoreError, match="do not fit"):
        other.import_archive(archive, check=lambda state: state["model"]["missing.weight"])
    assert other.current_version == 2


def _rewrite_archive(src: Path, dst: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(src) as zf:
        content = {n: zf.read(n) for n in zf.namelist()}
    content.update(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in content.items():
            zf.writestr(name, data)
    return dst


def test_import_refuses_tampered_archives(site: SiteModel, store: SiteModelStore, tmp_path: Path) -> None:
    site.save_version(make_state(1), {})
    archive = site.export(tmp_path / "a.zip")
    target = store.open("hospital-B", "unet3d", BASE)
    with zipfile.ZipFile(archive) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        weights = zf.read("weights.pt")

    corrupt = bytearray(weights)
    corrupt[len(corrupt) // 2] ^= 0xFF
    cases = {
        "sha256 does not match": {"weights.pt": bytes(corrupt)},
        "unsafe path": {"../escape.pt": b"x"},
        "must hold exactly": {"extra.txt": b"x"},
        "invalid manifest": {"manifest.json": b"not json"},
    }
    for message, members in cases.items():
        with pytest.raises(StoreError, match=message):
            target.import_archive(_rewrite_archive(archive, tmp_path / "bad.zip", members))
    with pytest.raises(StoreError, match="larger than"):
        target.import_archive(archive, max_bytes=100)
    (tmp_path / "notzip.zip").write_bytes(b"PK garbage")
    with pytest.raises(StoreError, match="cannot read archive"):
        target.import_archive(tmp_path / "notzip.zip")

    # A pickle payload with a matching checksum is stopped by weights_only loading.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Evil(marker)}, evil)
    payload = evil.read_bytes()
    manifest["sha256"] = hashlib.sha256(payload).hexdigest()
    bad = _rewrite_archive(archive, tmp_path / "evil.zip", {"weights.pt": payload, "manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(StoreError, match="weights_only"):
        target.import_archive(bad)
    assert not marker.exists()
    assert target.current_version == 0 and target.versions() == []


# ---------------------------------------------------------------------------- concurrency


def _accept_many(root: str, worker: int, n: int) -> None:
    """One 'Slicer instance': n accepts, each a load-adapt-save transaction on the newest version."""
    torch.set_num_threads(1)
    site = SiteModelStore(root).open("hospital-A", "unet3d", BASE)
    for i in range(n):
        with site.locked():
            state = site.load_current() or {"model": {"w": torch.zeros(16)}}
            state["model"]["w"] = state["model"]["w"] + 1  # every update builds on the last one
            site.save_version(state, {"worker": worker, "accept": i})


def test_two_processes_saving_concurrently(store: SiteModelStore, site: SiteModel) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_accept_many, args=(str(store.root), w, 20)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    adapt = [h for h in site.history() if h["action"] == "adapt"]
    assert len(adapt) == 40
    assert sorted(h["version"] for h in adapt) == list(range(1, 41))
    assert {h["worker"] for h in adapt} == {0, 1}
    assert site.current_version == 40
    final = site.load_current()
    assert torch.equal(final["model"]["w"], torch.full((16,), 40.0))  # no update was lost
    lock = FileLock(str(site.path / ".lock"), timeout=0)
    lock.acquire()  # raises Timeout if a process still held it
    lock.release()
    assert leftovers(site) == []


def test_busy_lock_refuses_save_but_not_reads(store: SiteModelStore, tmp_path: Path) -> None:
    site = SiteModelStore(store.root, lock_timeout=0.2).open("hospital-A", "unet3d", BASE)
    s1 = make_state(1)
    site.save_version(s1, {})
    other = FileLock(str(site.path / ".lock"))  # another workstation in the middle of a save
    with other:
        with pytest.raises(StoreError, match="locked by another process"):
            site.save_version(make_state(2), {})
        assert_same_state(s1, site.load_current())
    assert site.save_version(make_state(2), {}) == 2


def test_crashed_writer_leftovers_are_swept(site: SiteModel) -> None:
    site.save_version(make_state(1), {})
    stale = [site.path / "versions" / ".v000002.pt.abc123.tmp", site.path / ".manifest.json.def456.tmp"]
    for p in stale:
        p.write_bytes(b"half written")
    site.save_version(make_state(2), {})
    assert not any(p.exists() for p in stale)


def test_history_failure_after_commit_is_a_warning(site: SiteModel, monkeypatch: pytest.MonkeyPatch) -> None:
    s1 = make_state(1)
    real_open = os.open

    def full_history(path: object, *args: object, **kwargs: object) -> int:
        if Path(str(path)).name == "history.jsonl":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", full_history)
    with pytest.warns(StoreWarning, match="saved but its history line was not"):
        assert site.save_version(s1, {}) == 1
    monkeypatch.undo()
    assert_same_state(s1, site.load_current())
