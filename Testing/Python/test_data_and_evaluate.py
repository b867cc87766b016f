"""Dataset reading, the evaluate command's JSON and its error messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import require_shared_data, tiny_card, write_nnunet_dataset
from OAIMSSegment.cli import main
from OAIMSSegment.data import NnUNetDataset, synthetic_samples
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
    background = ~(a[0].image[0] > 0.3)  # the new site's scanner is much noisier
    assert t[0].image[0][background].std() > 3 * a[0].image[0][background].std()


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
        (["--dataset", str(rgb), "--working-size", "8"], "working_size must be >= 16"),
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
