"""The panel's keyboard and behaviour without Qt (issues 18 and 22): proposals stepped and picked from
the keyboard, the compute device, the install poll with its restart offer, the fields remembered, and
the shortcut and control tables the Widget wires. Logic on real MRML (slicer-core); the stand-ins are
those of ``slicer_test_doubles.py`` and the labelled ``Settings`` below.
"""

from __future__ import annotations

import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slicer_module import REPO, binary_model, module, proposal_logic, scene, world_of  # noqa: E402,F401

from OAIMSSegment import dependencies, mrml  # noqa: E402
from OAIMSSegment.errors import DeviceError, SessionStateError  # noqa: E402
from OAIMSSegment.module_state import (CONTROLS, RESTART_QUESTION, SETTINGS, SHORTCUTS, PanelController,  # noqa: E402
                                       model_entries, segment_name)
from OAIMSSegment.runner import JobRunner  # noqa: E402


class Settings(dict):
    """TEST DOUBLE of ``qt.QSettings`` (Qt): the two calls the panel makes, on a dict."""

    def value(self, key):
        return self.get(key)

    def setValue(self, key, value) -> None:
        self[key] = value


@pytest.fixture()
def clicked(module, scene, binary_model, tmp_path):
    """A Logic with one click on slice K=20 of a ball, and a small random proposal model."""
    logic, volume, segmentation, segment_id = proposal_logic(module, scene, binary_model, tmp_path)
    logic.addClick(world_of(volume, (28, 32, 20)), True)
    return logic, volume, segmentation, segment_id, mrml.locate_click(volume, world_of(volume, (28, 32, 20)), "Axial")


def visible(segmentation, segment_ids) -> list[bool]:
    return [bool(segmentation.GetDisplayNode().GetSegmentVisibility(s)) for s in segment_ids]


def test_proposals_step_from_the_keyboard_and_the_shown_one_is_picked(clicked):
    logic, volume, segmentation, segment_id, location = clicked
    with pytest.raises(SessionStateError, match="no proposals"):
        logic.stepProposal(1)
    ids = logic.proposeNextSteps(3, seed=0)
    assert logic.proposalSegments == ids and visible(segmentation, ids) == [True, False, False]
    shown = [mrml.read_slice_mask(segmentation, s, volume, location) for s in ids]
    assert logic.stepProposal(1) == 1 and visible(segmentation, ids) == [False, True, False]  # N
    assert logic.stepProposal(-1) == 0 and logic.stepProposal(-1) == 2  # Shift+N wraps around
    assert visible(segmentation, ids) == [False, False, True]
    logic.pickProposal()  # Shift+Return: the one shown
    assert logic.proposalSegments == [] and list(segmentation.GetSegmentation().GetSegmentIDs()) == [segment_id]
    np.testing.assert_array_equal(mrml.read_slice_mask(segmentation, segment_id, volume, location), shown[2])


def test_panel_keys_make_step_and_use_proposals(clicked):
    logic, volume, segmentation, segment_id, location = clicked
    lines: list[str] = []
    controller = PanelController(logic, JobRunner(pump=lambda: None), report=lines.append)
    assert controller.enabled()["proposals"]
    controller.stepProposal(1, k=2)  # the first N makes the proposals and shows the first
    ids = logic.proposalSegments
    assert len(ids) == 2 and visible(segmentation, ids) == [True, False] and lines[-1].startswith("Proposal 1 of 2")
    controller.stepProposal(1, k=2)
    assert visible(segmentation, ids) == [False, True] and lines[-1].startswith("Proposal 2 of 2")
    second = mrml.read_slice_mask(segmentation, ids[1], volume, location)
    controller.pickProposal()
    np.testing.assert_array_equal(mrml.read_slice_mask(segmentation, segment_id, volume, location), second)
    assert lines[-1].startswith("Proposal used") and logic.proposalSegments == []


def test_device_auto_is_the_cpu_here_and_an_absent_gpu_is_refused_clearly(clicked):
    logic, volume, *_ = clicked
    with pytest.raises(SessionStateError, match="accept or discard"):
        logic.setDevice("cpu")  # a segment has work
    logic.discard()
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        logic.setDevice("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match=r"'cuda' is not available.*torch.cuda.is_available\(\) is False.*available: cpu"):
            logic.setDevice("cuda")
    if not (torch.cuda.is_available() or torch.backends.mps.is_available()):
        assert logic.setDevice("auto") == "cpu"
    logic.setAdaptation(lr=3e-4)
    device = logic.setDevice("cpu")
    assert device == logic.device == "cpu" and logic.adaptationSettings()["lr"] == pytest.approx(3e-4)
    assert {p.device.type for p in logic.session.model.parameters()} == {"cpu"}
    logic.addClick(world_of(volume, (28, 32, 20)), True)
    assert logic.session.prepared.tensor.device.type == "cpu"


def test_install_poll_shows_progress_and_offers_a_restart_after_success(module, tmp_path):
    lines: list[str] = []
    controller = PanelController(module.OAIMSSegmentLogic(storeFolder=str(tmp_path)), JobRunner(pump=lambda: None),
                                 report=lines.append)
    for code, agree in ((0, True), (0, False), (3, True)):
        asked, restarted = [], []
        process = dependencies.BackgroundProcess([sys.executable, "-c", f"print('Collecting monai'); raise SystemExit({code})"])
        deadline = time.monotonic() + 60
        while not controller.pollInstall(process, lambda text: asked.append(text) or agree, lambda: restarted.append(1)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "Collecting monai" in lines
        if code == 0:
            assert asked == [RESTART_QUESTION] and restarted == ([1] if agree else []) and lines[-1] == "Installed."
        else:
            assert asked == [] and restarted == [] and "pip exit code 3" in lines[-1]


def test_committed_fields_are_remembered_and_existing_sites_listed(module, scene, binary_model, tmp_path):
    logic = module.OAIMSSegmentLogic(storeFolder=str(tmp_path / "sites"))
    logic.setModel(binary_model)
    settings = Settings()
    controller = PanelController(logic, JobRunner(pump=lambda: None), settings=settings)
    assert controller.commitSite("radiology") and settings == {SETTINGS["site"]: "radiology"}
    assert not controller.commitSite("radiology")  # Enter then focus-out: once
    assert controller.siteChoices("typed") == ["default", "radiology", "typed"]
    shared = tmp_path / "browsed"  # what Browse or Enter leaves in the path field: the same commit
    assert controller.commitStore(str(shared)) and settings[SETTINGS["store"]] == str(shared)
    assert logic.storeFolder == str(shared) and controller.siteChoices("default") == ["default", "radiology"]
    assert segment_name(logic.card) == "lesion" and segment_name(None) == "Segment"
    entries = model_entries([{"name": "m", "task": "t"}], ["monai"])
    assert [data for _, data in entries] == ["", "__install__", "m"]


def test_shortcut_and_control_tables_match_the_widget_the_ui_and_the_docs():
    source = (REPO / "OAIMSSegment.py").read_text()
    widget = source[source.index("class OAIMSSegmentWidget"):source.index("class OAIMSSegmentTest")]
    actions = set(re.findall(r'"(\w+)": (?:lambda|self\.)', widget))
    assert {name for _, name, _ in SHORTCUTS} <= actions, sorted({name for _, name, _ in SHORTCUTS} - actions)
    keys = [key for key, _, _ in SHORTCUTS]
    assert len(set(keys)) == len(keys)
    # Keys Slicer's slice views already use (v5.8.1 vtkMRMLSliceIntersectionWidget.cxx:164-192) stay theirs.
    assert not {key.lower() for key in keys} & {"f", "b", "g", "t", "v", "r", "s"}
    docs = (REPO / "docs" / "SLICER.md").read_text()
    for key in keys:
        assert f"| `{key}` |" in docs, f"{key} is not in docs/SLICER.md's shortcut table"
    names = {w.get("name") for w in ET.parse(REPO / "Resources" / "UI" / "OAIMSSegment.ui").iter("widget")}
    assert {n for group in CONTROLS.values() for n in group} <= names
    used = set(re.findall(r"\bui\.(\w+)", widget))
    assert used <= names, sorted(used - names)
    assert len(source.splitlines()) <= 800  # the module file: Logic glue, Qt wiring and the self-test only
