"""Dataset reading, the evaluate command's JSON and its error messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import require_shared_data, tiny_card, write_nnunet_dataset
from OAIMSSegment.cli import main
from OAIMSSegment.data import TARGET_RIM_PX, NnUNetDataset, synthetic_samples
from OAIMSSegment.errors import DatasetError
from OAIMSSegment.model import ClickSegmenter, save_model
from OAIMSSegment.session import DEFAULT_LR


def test_nifti_volumes_are_cut_into_slices_with_foreground(tmp_path):
    dataset = NnUNetDataset(write_nnunet_dataset(tmp_path / "ds", "nifti"))
    samples = list(dataset.samples("Ts"))
    assert len(samples) == 9  # 3 cases x slices 2..4
    assert samples[0].image.shape == (1, 48, 48) and samples[0].label.shape == (48, 48)
    assert all(s.label.any() for s in samples) and samples[0].name == "case0:2"


def test_rgb_png_is_read_channels_first(tmp_path):
    dataset = NnUNetDataset(write_nnunet_dataset(tmp_path / "ds", "png", rgb=True))
    sample = next(dataset.samples("Ts"))
    assert dataset.rgb and sample.image.shape == (3, 40, 40)
    assert set(np.unique(sample.label)) == {0, 1, 2}


def test_bad_datasets_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        NnUNetDataset(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        NnUNetDataset(tmp_path / "bad")
    (tmp_path / "bad" / "dataset.json").write_text('{"labels": {}}')
    with pytest.raises(DatasetError, match="channel_names"):
        NnUNetDataset(tmp_path / "bad")


def test_synthetic_domains_are_seeded_and_shifted():
    a = synthetic_samples(3, "source", seed=1)
    b = synthetic_samples(3, "source", seed=1)
    t = synthetic_samples(3, "target", seed=1)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert np.array_equal(a[0].label, t[0].label)  # same geometry, other appearance
    inside = a[0].label.astype(bool)
    assert a[0].image[0][inside].mean() > a[0].image[0][~inside].mean()
    # the new site: each blob a bright rim around a dark core, and the core is still the object
    core = ndimage.binary_erosion(inside, iterations=TARGET_RIM_PX)
    rim = inside & ~core
    assert core.sum() > 20 and rim.sum() > 20
    assert abs(t[0].image[0][rim].mean() - a[0].image[0][rim].mean()) < 0.03
    assert t[0].image[0][core].mean() < 0.2 * a[0].image[0][core].mean()
    background = ~ndimage.binary_dilation(np.any([s.image[0] > 0.15 for s in a[:1]], axis=0), iterations=2)
    assert abs(t[0].image[0][background].mean()) < 0.02 and abs(a[0].image[0][background].mean()) < 0.02


@pytest.fixture
def tiny_weights(tmp_path):
    path = tmp_path / "tiny.pt"
    save_model(ClickSegmenter(tiny_card()), path)
    return path


def test_evaluate_writes_the_documented_json(tmp_path, tiny_weights):
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=2)
    out = tmp_path / "out.json"
    code = main(["evaluate", "--model", str(tiny_weights), "--dataset", str(root), "--methods", "frozen,pi+mi",
                 "--clicks", "3", "--max-images", "3", "--json", str(out), "--plot", str(tmp_path / "p.png")])
    assert code == 0
    summary = json.loads(out.read_text())
    assert {"results", "n_images", "dataset", "model", "seed"} <= set(summary)
    assert summary["n_images"] == 3
    assert summary["config"]["lr"] == DEFAULT_LR  # the tiny card names no adaptation learning rate
    for method in ("frozen", "pi+mi"):
        result = summary["results"][method]
        assert len(result["dice"]) == 3 and all(0.0 <= d <= 1.0 for d in result["dice"])
        assert set(result["dice_per_class"]) == {"lesion"}
        slices = {sample.name for sample in NnUNetDataset(root).samples("Ts")}
        assert len(result["per_image"]) == 3 and set(result["per_image"]) <= slices
        assert np.allclose(np.mean(list(result["per_image"].values()), axis=0), result["dice"])
        assert set(result["noc"]) == {"80", "90"} and 1 <= result["noc"]["80"] <= 20
        assert set(result["latency_ms"]) == {"mi_p50", "mi_p95", "pi_p50", "pi_p95"}
    assert summary["results"]["frozen"]["latency_ms"]["mi_p50"] is None
    assert summary["results"]["pi+mi"]["latency_ms"]["mi_p50"] > 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_evaluate_working_size_overrides_the_card_and_is_recorded(tmp_path, tiny_weights):
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=2)
    summaries = {}
    for size in ("0", "16"):
        out = tmp_path / f"ws{size}.json"
        code = main(["evaluate", "--model", str(tiny_weights), "--dataset", str(root), "--methods", "frozen",
                     "--clicks", "2", "--max-images", "2", "--working-size", size, "--json", str(out)])
        assert code == 0
        summaries[size] = json.loads(out.read_text())
    assert summaries["0"]["card_overrides"] == {"working_size": None}
    assert summaries["16"]["card_overrides"] == {"working_size": 16}
    dice = [summaries[size]["results"]["frozen"]["dice"] for size in ("0", "16")]
    assert dice[0] != dice[1]  # a 16 px working grid segments differently from the native one


def test_benchmark_tables_are_refreshed_in_place_and_stay_separate(tmp_path, tiny_weights):
    """``scripts/tables.py --update`` rewrites each ``**name**:`` block from results/name.json and
    keeps a blank line after each table, so back-to-back blocks render as separate tables."""
    spec = importlib.util.spec_from_file_location("tables", Path(__file__).parents[2] / "scripts" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=2)
    (tmp_path / "results").mkdir()
    assert main(["evaluate", "--model", str(tiny_weights), "--dataset", str(root), "--methods", "frozen",
                 "--clicks", "3", "--max-images", "2", "--json", str(tmp_path / "results" / "run.json")]) == 0
    stale = "| method | 1 click |\n|---|---|\n| frozen | 99.9 |\n"
    document = tmp_path / "doc.md"
    document.write_text(f"**run**: model `old`\n\n{stale}**run**: model `old`\n\n{stale}end\n")
    assert tables.update(document, tmp_path / "results") == ["run", "run"]
    text = document.read_text()
    assert "99.9" not in text and text.count("| frozen |") == 2
    assert text.count(f"adaptation lr {tables.scientific(DEFAULT_LR)}") == 2 and tables.scientific(3e-4) == "3e-4"
    blocks = text.split("\n\n")
    assert blocks[-1] == "end\n" and sum(block.startswith("**run**: model `") for block in blocks) == 2


def test_evaluate_errors_exit_2_with_one_line(tmp_path, tiny_weights, capsys):
    rgb = write_nnunet_dataset(tmp_path / "rgb", "png", rgb=True)
    for args, message in [
        (["--dataset", str(tmp_path / "nowhere")], "does not exist"),
        (["--dataset", str(rgb)], "channel"),
    ]:
        code = main(["evaluate", "--model", str(tiny_weights), *args, "--json", str(tmp_path / "x.json")])
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err


@pytest.mark.data
def test_real_brats_and_fundus_datasets_read():
    flair = NnUNetDataset(require_shared_data("Dataset001_BraTS18_FLAIR"))
    sample = next(flair.samples("Ts"))
    assert sample.image.shape == (1, 240, 240) and sample.label.any()
    fundus = NnUNetDataset(require_shared_data("Dataset003_DrishtiGS"))
    eye = next(fundus.samples("Ts"))
    assert eye.image.shape[0] == 3 and set(np.unique(eye.label)) <= {0, 1, 2}


def _meta(root, **changes):
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(changes)
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("meta, message", [
    ("42", "must hold a JSON object, got int 42"),
    ('["channel_names", "labels"]', "must hold a JSON object, got list"),
    ({"labels": {"background": 0, "lesion": 1.5}}, "label 'lesion' must be an integer class index, got 1.5"),
    ({"labels": {"background": 0, "lesion": "one"}}, "label 'lesion' must be an integer"),
    ({"labels": {"background": 0, "lesion": True}}, "label 'lesion' must be an integer"),
    ({"labels": ["background", "lesion"]}, "labels must map class names to integers, got list"),
    ({"labels": {"background": 0, "whole": [1, 2]}}, "label 'whole' is a region"),
    ({"channel_names": {"a": "FLAIR"}}, "channel_names keys must be integers 0..0, got 'a'"),
    ({"channel_names": {"1": "FLAIR"}}, r"channel_names keys must be 0..0"),
    ({"channel_names": ["FLAIR"]}, "channel_names must map"),
    ({"file_ending": 5}, "file_ending must be a string"),
])
def test_malformed_dataset_json_is_named(tmp_path, tiny_weights, capsys, meta, message):
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=1)
    if isinstance(meta, str):
        (root / "dataset.json").write_text(meta)
    else:
        _meta(root, **meta)
    with pytest.raises(DatasetError, match=message):
        NnUNetDataset(root)
    assert main(["evaluate", "--model", str(tiny_weights), "--dataset", str(root), "--json", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "dataset.json" in err


def test_4d_and_zero_size_volumes_are_named(tmp_path):
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=1)
    four_d = np.zeros((2, 6, 48, 48), np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(four_d), str(root / "imagesTs" / "case0_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(four_d.astype(np.uint8)), str(root / "labelsTs" / "case0.nii.gz"))
    with pytest.raises(DatasetError, match=r"case0: image \(2, 6, 48, 48\) and label .* must be 2D or 3D .*4D"):
        list(NnUNetDataset(root).samples("Ts"))
    # A MetaImage header can declare a zero-size volume (NIfTI readers round 0 up to 1).
    empty = tmp_path / "empty"
    (empty / "imagesTs").mkdir(parents=True)
    (empty / "labelsTs").mkdir()
    (empty / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "FLAIR"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".mha"}))
    header = b"ObjectType = Image\nNDims = 3\nDimSize = 5 5 0\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    for path in (empty / "imagesTs" / "void_0000.mha", empty / "labelsTs" / "void.mha"):
        path.write_bytes(header)
    with pytest.raises(DatasetError, match=r"void: image \(0, 5, 5\) or label \(0, 5, 5\) has a zero-size dimension"):
        list(NnUNetDataset(empty).samples("Ts"))


@pytest.mark.parametrize("option, message", [
    (["--max-images", "0"], "--max-images: must be at least 1, got 0"),
    (["--seeds", "0"], "--seeds: must be at least 1"),
    (["--methods", ","], "--methods: is an empty list"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lr", "-1"], "--lr: must be greater than 0"),
    (["--sigma", "inf"], "--sigma: must be a finite number"),
    (["--wrong-fraction", "nan"], "--wrong-fraction: must be a finite number"),
    (["--clicks", "0"], "--clicks: must be at least 1"),
    (["--working-size", "100000"], "--working-size: must be 16..4096 px, got 100000 (or 0: native resolution)"),
    (["--working-size", "8"], "--working-size: must be 16..4096 px, got 8"),
    (["--min-foreground", "100000"], "no axial slice of ds/imagesTs has at least 100000 foreground pixel"),
])
def test_evaluate_options_are_refused_in_one_line(tmp_path, tiny_weights, capsys, monkeypatch, option, message):
    import OAIMSSegment.evaluate as evaluation

    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=1)
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(SystemExit) if option[0] != "--min-foreground" else _returns(2):
        code = main(["evaluate", "--model", str(tiny_weights), "--dataset", str(root), *option,
                     "--json", str(tmp_path / "o.json")])
        raise SystemExit(code)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "o.json").exists()


class _returns:
    """``pytest.raises(SystemExit)`` for a command that returns its exit code instead."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        assert kind is SystemExit and value.code == self.code
        return True


def test_unwritable_json_is_found_before_the_run(tmp_path, tiny_weights, capsys, monkeypatch):
    import OAIMSSegment.evaluate as evaluation

    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=1)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setattr(evaluation, "load_model", lambda *a: pytest.fail("the run started"))
    for target, message in [(tmp_path / "a-file" / "o.json", "is not a folder"), (tmp_path, "is a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["evaluate", "--model", str(tiny_weights), "--dataset", str(root), "--json", str(target)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "--json" in err and message in err and "\n" not in err
    assert (tmp_path / "a-file").read_text() == "x"


def test_unusable_slices_are_skipped_named_and_counted(tmp_path, tiny_weights, capsys):
    root = write_nnunet_dataset(tmp_path / "ds", "nifti", n=2)
    # MetaImage keeps NaN (ITK's NIfTI reader turns it into a number).
    for path in sorted(root.glob("*/*.nii.gz")):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if path.name == "case0_0000.nii.gz":
            image[3, 5, 5] = np.nan
        if path.name == "case1_0000.nii.gz":
            image[2] = 5.0
        sitk.WriteImage(sitk.GetImageFromArray(image), str(path).replace(".nii.gz", ".mha"))
        path.unlink()
    _meta(root, file_ending=".mha")
    small = np.zeros((4, 8, 8), np.uint8)
    small[2, 2:6, 2:6] = 1
    sitk.WriteImage(sitk.GetImageFromArray(small.astype(np.float32) * 3 + 1), str(root / "imagesTs" / "tiny_0000.mha"))
    sitk.WriteImage(sitk.GetImageFromArray(small), str(root / "labelsTs" / "tiny.mha"))
    out = tmp_path / "o.json"
    assert main(["evaluate", "--model", str(tiny_weights), "--dataset", str(root), "--methods", "frozen",
                 "--clicks", "1", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["n_skipped"] == 3 and summary["n_images"] == 4
    reasons = {s["name"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"case0:3", "case1:2", "tiny:2"}
    assert "NaN" in reasons["case0:3"] and "constant" in reasons["case1:2"] and "16 px" in reasons["tiny:2"]
    printed = capsys.readouterr().out
    assert "skipped 3 of 7 slice(s)" in printed and "case0:3" in printed


def test_pretrain_options_are_refused_in_one_line(tmp_path, capsys):
    base = ["pretrain", "--dataset", "synthetic", "--out", str(tmp_path / "m.pt")]
    for option, message in [(["--lr", "nan"], "--lr: must be a finite number"), (["--steps", "0"], "--steps: must be at least 1"),
                            (["--working-size", "100000"], "must be 16..4096 px, got 100000"), (["--channels", "8,x"], "--channels"),
                            (["--batch-size", "-2"], "--batch-size"),
                            (["--out", str(Path(__file__) / "x.pt")], "is not a folder")]:
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *option])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
    assert not list(tmp_path.iterdir())
