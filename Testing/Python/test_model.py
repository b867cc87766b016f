"""Model cards, preprocessing and safe weights loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_card
from OAIMSSegment.errors import ModelError
from OAIMSSegment.files import sha256_file
from OAIMSSegment.model import ClickSegmenter, ModelCard, list_models, load_model, save_model


def test_save_and_load_round_trip(tmp_path, tiny_model):
    card = save_model(tiny_model, tmp_path / "m.pt", metrics={"dice": 0.5})
    assert card.sha256 == sha256_file(tmp_path / "m.pt")
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == {"dice": 0.5}
    loaded = load_model(tmp_path / "m.pt")
    for a, b in zip(loaded.state_dict().values(), tiny_model.state_dict().values()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves nothing behind


def test_corrupt_or_foreign_weights_are_refused(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m.pt")
    data = bytearray((tmp_path / "m.pt").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "m.pt").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(tmp_path / "m.pt")
    # weights of another architecture under a card that does not fit them
    other = ClickSegmenter(tiny_card(network={"channels": [4, 8], "strides": [2], "num_res_units": 1, "norm": "instance"}, name="other"))
    save_model(other, tmp_path / "o.pt")
    card = json.loads((tmp_path / "o.json").read_text())
    card["network"] = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "instance"}
    (tmp_path / "o.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="architecture"):
        load_model(tmp_path / "o.pt")
    with pytest.raises(ModelError, match="unknown model"):
        load_model("no-such-model")


class Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_payload_is_never_executed(tmp_path, tiny_model, capsys):
    save_model(tiny_model, tmp_path / "m.pt")
    torch.save({"weights": Exploit()}, tmp_path / "m.pt")
    card = json.loads((tmp_path / "m.json").read_text())
    card["sha256"] = sha256_file(tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="cannot load"):
        load_model(tmp_path / "m.pt")
    assert "pickle code ran" not in capsys.readouterr().out


def test_card_validation():
    with pytest.raises(ModelError, match="background"):
        ModelCard(name="x", task="x", image_channels=1, labels={"lesion": 1, "other": 0})
    with pytest.raises(ModelError, match="normalization"):
        ModelCard(name="x", task="x", image_channels=1, labels={"background": 0, "a": 1}, normalization="magic")
    with pytest.raises(ModelError, match="working_size must be >= 16 px"):  # a card file edited by hand
        ModelCard(name="x", task="x", image_channels=1, labels={"background": 0, "a": 1}, working_size=8)


def test_normalisation_and_large_images_are_bounded(tiny_model):
    image = np.zeros((1200, 900), np.float32)
    image[100:400, 100:400] = 1000.0
    image[500:600, 500:600] = 300.0
    prepared = tiny_model.prepare(image)
    assert max(prepared.working_shape) == tiny_model.card.max_side  # down-scaled, aspect kept
    assert prepared.working_shape == (512, 384)
    values = prepared.tensor[0, 0, :512, :384]
    foreground = values[values != 0]
    assert abs(float(foreground.mean())) < 0.1 and abs(float(foreground.std()) - 1) < 0.1


def test_masks_shrink_onto_the_image_grid_without_a_shift():
    """A mask resized to the working grid must stay on the image: the round trip to the
    original size keeps a small structure's centre and most of its Dice (torch's plain
    "nearest" shifted it by almost half a working pixel)."""
    model = ClickSegmenter(tiny_card(labels={"background": 0, "rim": 1, "cup": 2}, working_size=128))
    rows, cols = np.mgrid[0:240, 0:240]
    image = np.random.default_rng(0).normal(size=(240, 240)).astype(np.float32)
    mask = np.zeros((240, 240), np.int64)
    mask[(rows - 101.0) ** 2 + (cols - 77.0) ** 2 <= 12**2] = 1
    mask[(rows - 101.0) ** 2 + (cols - 77.0) ** 2 <= 5**2] = 2
    prepared = model.prepare(image)
    working = prepared.mask_to_working(mask)
    assert working.shape == prepared.tensor.shape[-2:] and set(working.unique().tolist()) == {0, 1, 2}
    one_hot = torch.nn.functional.one_hot(working, 3).permute(2, 0, 1)[None].float()
    back = prepared.logits_to_original(one_hot).argmax(dim=1)[0].numpy()
    for k in (1, 2):
        dice = 2 * ((back == k) & (mask == k)).sum() / ((back == k).sum() + (mask == k).sum())
        assert dice > 0.85, (k, dice)
    centre = np.argwhere(back > 0).mean(axis=0)
    assert np.abs(centre - [101.0, 77.0]).max() < 0.3


def test_shipped_cards_are_complete():
    cards = list_models()
    assert cards, "no model is shipped in Resources/Models"
    for card in cards:
        assert card.sha256 and card.weights and card.training.get("command"), card.name
        model = load_model(card.name)  # verifies the sha256
        assert model.card.name == card.name


@pytest.mark.parametrize("sha", ["", None, "abc"])
def test_card_without_a_checksum_is_refused(tmp_path, tiny_model, sha):
    save_model(tiny_model, tmp_path / "m.pt")
    card = json.loads((tmp_path / "m.json").read_text())
    if sha is None:
        del card["sha256"]
    else:
        card["sha256"] = sha
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"model card .*m\.json has no sha256"):
        load_model(tmp_path / "m.pt")


def test_every_shipped_card_has_the_checksum_of_its_weights():
    from OAIMSSegment.model import MODELS_DIR

    cards = sorted(MODELS_DIR.glob("*.json"))
    assert len(cards) >= 5
    for path in cards:
        card = json.loads(path.read_text())
        assert len(card.get("sha256") or "") == 64, f"{path.name} has no sha256"
        assert sha256_file(path.parent / card["weights"]) == card["sha256"], path.name
