"""Saving and loading proposal models: weights ``<name>.pt`` beside a model card ``<name>.json``.

The weights file holds ``{"format", "config", "state_dict"}``; the card says what the model is
(``"kind": "proposals"``), how it was trained and measured, and the weights' sha256, checked on
every load. Both files are written atomically (:func:`OAIMSSegment.files.atomic_write_bytes`).
Shipped models live in :data:`OAIMSSegment.model.MODELS_DIR` beside the segmentation models.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from OAIMSSegment.errors import ModelError
from OAIMSSegment.files import atomic_write_bytes, atomic_write_text, sha256_file
from OAIMSSegment.model import MODELS_DIR, PROPOSALS_KIND, card_kind, shipped_cards
from OAIMSSegment.proposals.model import ProposalConfig, ProposalModel

__all__ = ["WEIGHTS_FORMAT", "save_proposal_model", "load_proposal_model", "model_files", "read_card", "write_card"]

#: Format tag stored in every weights file.
WEIGHTS_FORMAT = "oaims-proposals-v1"


def write_card(path: Path, card: dict[str, Any]) -> None:
    """Write a model card as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(card, indent=2) + "\n")


def read_card(path: Path) -> dict[str, Any]:
    """A proposal model's card.

    Raises:
        ModelError: unreadable JSON, or a card of another kind of model (a segmentation model).
    """
    try:
        card = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read model card {path}: {error}") from error
    kind = card_kind(card)
    if kind != PROPOSALS_KIND:
        raise ModelError(f"{path} is the card of a {kind!r} model, not of a proposal model")
    return card


def save_proposal_model(model: ProposalModel, path: Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (weights + config) and ``path.with_suffix('.json')`` (card with its sha256).

    Returns the card as written.
    """
    path = Path(path)
    config = asdict(model.config)
    config["encoder_channels"] = list(config["encoder_channels"])
    buffer = io.BytesIO()
    torch.save({"format": WEIGHTS_FORMAT, "config": config, "state_dict": model.state_dict()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    card = {**card, "kind": PROPOSALS_KIND, "weights": path.name, "config": config, "sha256": sha256_file(path)}
    write_card(path.with_suffix(".json"), card)
    return card


def model_files(name_or_path: str | Path) -> tuple[Path, Path | None]:
    """Weights path and card path (None when a user's file has no card beside it).

    A bare name (no folder, no ``.pt``) is a shipped model in :data:`MODELS_DIR`.

    Raises:
        ModelError: an unknown shipped name, or a weights file that does not exist.
    """
    text = str(name_or_path)
    if "/" not in text and "\\" not in text and not text.endswith(".pt"):
        weights, card = MODELS_DIR / f"{text}.pt", MODELS_DIR / f"{text}.json"
        if not card.is_file() or not weights.is_file():
            known = sorted(path.stem for path, _ in shipped_cards(PROPOSALS_KIND))
            raise ModelError(f"unknown proposal model {text!r}; shipped: {', '.join(known) or 'none'}")
        return weights, card
    weights = Path(text)
    if not weights.is_file():
        raise ModelError(f"proposal model file {weights} does not exist")
    card = weights.with_suffix(".json")
    return weights, card if card.is_file() else None


def load_proposal_model(name_or_path: str | Path = "proposals-synthetic-disks") -> ProposalModel:
    """A trained proposal model in eval mode, its card (or ``{}``) in ``model.card``.

    Args:
        name_or_path: a shipped model's name (``Resources/Models/<name>.pt`` + ``.json``) or
            a path to a ``.pt`` written by ``proposals-train``; a card beside it is checked.

    Raises:
        ModelError: unknown name, missing or unreadable file, a card of another kind of model,
            sha256 differing from the card, or weights that do not fit the architecture.
    """
    weights, card_path = model_files(name_or_path)
    card: dict[str, Any] = {}
    if card_path is not None:
        card = read_card(card_path)
        actual = sha256_file(weights)
        if card.get("sha256") != actual:
            raise ModelError(f"{weights.name}: sha256 {actual} does not match its card ({card.get('sha256')})")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise ModelError(f"cannot load proposal weights {weights}: {error}") from error
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ModelError(f"{weights} is not a proposal model ({WEIGHTS_FORMAT})")
    try:
        config = dict(blob["config"])
        config["encoder_channels"] = tuple(config["encoder_channels"])
        model = ProposalModel(ProposalConfig(**config))
        model.load_state_dict(blob["state_dict"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise ModelError(f"{weights}: weights do not fit the proposal architecture: {error}") from error
    model.card = card
    return model.eval()
