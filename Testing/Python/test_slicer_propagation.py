"""Issue 19, item 3, on real MRML (slicer-core): the Logic propagates a click's slice through the
volume in the view's axis, correction clicks on any slice, Accept covering the segment, and undo
restoring exactly the previous segment; and the panel's propagate action (PanelController, no Qt).

The model is the shipped demo model (a trained click-guided U-Net) on a bright ellipsoid, with the
propagation rule measured for it in ``test_volume.py``. Only the stand-ins of
``slicer_test_doubles.py`` and the labelled ``HistoryEditor`` (the Segment Editor's undo over Slicer's
real ``vtkSegmentationHistory``) are not the real thing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slicer_module import (add_parent_transform, add_volume, export_segment, module, oblique_geometry,  # noqa: E402,F401
                                scene, world_of)
from test_slicer_segment import HistoryEditor, same, weights  # noqa: E402
from test_volume import DEMO_RULE, ellipsoid  # noqa: E402

from OAIMSSegment import mrml  # noqa: E402
from OAIMSSegment.errors import SessionStateError  # noqa: E402
from OAIMSSegment.evaluate_volumes import volume_dice  # noqa: E402
from OAIMSSegment.module_state import EditorUndo, Marker, PanelController  # noqa: E402
from OAIMSSegment.runner import JobRunner  # noqa: E402


@pytest.fixture()
def oblique(module, scene, tmp_path):
    """The ellipsoid (16 slices of 64 x 64) on a flipped, oblique grid (1 x 1 x 2.5 mm: the demo model
    was trained on round blobs) under a rotated parent transform; a Logic on the demo model with its
    measured propagation rule."""
    voxels, truth = ellipsoid()
    geometry = oblique_geometry()
    geometry[:3, :3] = geometry[:3, :3] @ np.diag([1 / 0.8, 1 / 1.2, 1.0])
    volume = add_volume(scene, voxels, geometry)
    parent = add_parent_transform(scene, volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    logic = module.OAIMSSegmentLogic(storeFolder=str(tmp_path / "sites"))
    logic.setModel("demo-synthetic-blobs")
    logic.propagationRule = DEMO_RULE
    (segment_id,) = logic.startSegment(volume, segmentation).values()
    return logic, volume, parent, segmentation, segment_id, truth


def nonempty(array: np.ndarray) -> list[int]:
    return np.flatnonzero(array.reshape(len(array), -1).any(axis=1)).tolist()


def test_propagate_fills_the_structure_in_the_view_axis_and_undo_restores_the_segment(oblique, scene):
    logic, volume, parent, segmentation, segment_id, truth = oblique
    with pytest.raises(SessionStateError, match="click in a slice first"):
        logic.propagate()
    slices = mrml.volume_slices(volume, 2)  # what the worker propagates through: a copy, slice by slice as extracted
    assert slices.shape == (16, 1, 64, 64) and not np.shares_memory(slices, mrml.volume_array(volume))
    np.testing.assert_array_equal(slices[8], mrml.extract_slice(volume, mrml.slice_location(volume, 2, 8)))
    report = logic.addClick(world_of(volume, (34, 30, 8), parent), True, "Axial")
    assert (report["sliceAxis"], report["sliceIndex"]) == ("K", 8) and "propagatedSlices" not in report
    clicked = export_segment(scene, segmentation, segment_id, volume)
    assert nonempty(clicked) == [8]
    before = weights(logic)
    propagated = logic.propagate()
    assert propagated["sliceAxis"] == "K" and propagated["origin"] == 8 and propagated["latencyMs"] > 0
    segment = export_segment(scene, segmentation, segment_id, volume)  # Slicer's exporter, on the volume grid
    assert propagated["slices"] == [k for k in nonempty(segment) if k != 8]
    assert set(propagated["slices"]) >= {6, 7, 9, 10}, propagated  # the structure spans slices 3..13
    assert set(nonempty(segment)) <= set(range(2, 15))  # and propagation stopped near its end
    labels = {"background": 0, "blob": 1}
    assert volume_dice(segment.astype(np.int64), truth, labels) > volume_dice(clicked.astype(np.int64), truth, labels) + 0.3
    assert same(weights(logic), before) and logic.workedSlices == [(2, 8)]  # no adaptation, no new worked slice
    # Undo takes the propagation back alone, exactly; the click stays.
    undone = logic.undoClick()
    assert undone["clicks"] == 1 and undone["slices"] == propagated["slices"]
    np.testing.assert_array_equal(export_segment(scene, segmentation, segment_id, volume), clicked)
    logic.undoClick()
    assert not export_segment(scene, segmentation, segment_id, volume).any()


def test_correction_on_a_propagated_slice_repropagates_and_accept_learns_from_worked_slices(oblique, scene):
    logic, volume, parent, segmentation, segment_id, truth = oblique
    logic.autoPropagate, logic.refreshAfterAdaptation = True, False
    first = logic.addClick(world_of(volume, (34, 30, 8), parent), True, "Axial")
    assert first["propagatedSlices"] and 11 in first["propagatedSlices"], first
    after_first = export_segment(scene, segmentation, segment_id, volume)
    # A correction click on propagated slice 11 joins its seeds (one foreground seed + this click)
    # and re-propagates away from the worked slice 8 whose propagation had reached it: slices 9 and 10,
    # derived from slice 8, stay (volume.propagation_steps; without the refresh tested below).
    correction = logic.addClick(world_of(volume, (5, 5, 11), parent), False, "Axial")
    assert correction["newImage"] and correction["clicks"] == 2, correction
    assert correction["adaptMs"] > 0  # not the slice's first click: an MI step
    assert all(k > 11 for k in correction["propagatedSlices"])
    segment = export_segment(scene, segmentation, segment_id, volume)
    np.testing.assert_array_equal(segment[: 11], after_first[: 11])  # slice 10 and below untouched
    assert logic.workedSlices == [(2, 8), (2, 11)]
    # One undo takes the correction back with the propagation that followed it, exactly.
    logic.undoClick()
    np.testing.assert_array_equal(export_segment(scene, segmentation, segment_id, volume), after_first)
    logic.addClick(world_of(volume, (5, 5, 11), parent), False, "Axial")
    # The clinician paints on propagated slice 7 without clicking it: Accept learns from it too.
    assert 7 in first["propagatedSlices"] and 6 in first["propagatedSlices"]
    at = {k: mrml.slice_location(volume, 2, k) for k in (6, 7, 8, 11)}
    painted = mrml.read_slice_mask(segmentation, segment_id, volume, at[7])
    painted[:, :34] = False  # erase its left half
    mrml.write_slice_mask(segmentation, volume, at[7], painted.astype(np.uint8), {1: segment_id})
    held = {k: int(mrml.read_slice_mask(segmentation, segment_id, volume, at[k]).sum()) for k in at}
    accepted = logic.accept()
    assert [(row["sliceIndex"], row["acceptedPixels"]) for row in accepted["slices"]] == [(k, held[k]) for k in (8, 11, 7)]
    assert held[7] == int(painted.sum()) and held[6] > 0  # slice 6, propagated and left alone, is not learnt from
    assert accepted["saved"] and accepted["version"] == 1
    assert len(nonempty(export_segment(scene, segmentation, segment_id, volume))) > 2  # propagated slices stay


def test_an_mi_step_click_refreshes_the_other_worked_slices_chains_as_one_undo_step(oblique, scene):
    """The default refreshAfterAdaptation: the propagation after a correction that made an MI step
    also re-propagates from worked slice 8 with the adapted weights (what SegmentWork.propagate from
    slice 8 gives now), both ways; one undo restores the segment exactly."""
    logic, volume, parent, segmentation, segment_id, _ = oblique
    assert logic.refreshAfterAdaptation
    logic.autoPropagate = True
    logic.setAdaptation(lr=1e-3)  # a step large enough to change the masks
    logic.addClick(world_of(volume, (34, 30, 8), parent), True, "Axial")
    after_first = export_segment(scene, segmentation, segment_id, volume)
    correction = logic.addClick(world_of(volume, (5, 5, 11), parent), False, "Axial")
    assert correction["adaptMs"] > 0
    assert min(correction["propagatedSlices"]) < 8, correction
    read = lambda k: mrml.read_slice_classes(segmentation, volume, mrml.slice_location(volume, 2, k), {1: segment_id})  # noqa: E731
    propagated, _ = logic._work.propagate(mrml.volume_slices(volume, 2), mrml.in_plane_spacing(volume, 2), 8, read(8),
                                          {11}, logic.propagationRule)
    below = [(k, mask) for k, mask, _ in propagated if k < 11]
    assert below and all(np.array_equal(read(k), mask) for k, mask in below)
    logic.undoClick()
    np.testing.assert_array_equal(export_segment(scene, segmentation, segment_id, volume), after_first)


def test_panel_propagates_after_a_click_and_one_ctrl_z_restores_the_segment(oblique, scene):
    logic, volume, parent, segmentation, segment_id, _ = oblique
    states = EditorUndo(HistoryEditor(segmentation), lambda: mrml.segment_stamp(segmentation, segment_id))
    controller = PanelController(logic, JobRunner(pump=lambda: None), states)
    assert not controller.enabled()["propagate"]
    removed = []
    controller.click(world_of(volume, (34, 30, 8), parent), True, "Axial", Marker(lambda: removed.append(1)))
    clicked = export_segment(scene, segmentation, segment_id, volume)
    assert controller.enabled()["propagate"] and "propagatedSlices" not in controller.last
    controller.propagate()  # the P key
    assert controller.last["slices"] and len(controller.steps) == 2
    controller.undo()  # the propagation alone
    np.testing.assert_array_equal(export_segment(scene, segmentation, segment_id, volume), clicked)
    assert removed == [] and len(logic.session.clicks) == 1
    logic.autoPropagate = True
    before = export_segment(scene, segmentation, segment_id, volume)
    controller.click(world_of(volume, (20, 30, 8), parent), True, "Axial", Marker(lambda: removed.append(2)))
    assert controller.last["propagatedSlices"], controller.last
    controller.undo()  # the click, its MI update and its propagation together
    np.testing.assert_array_equal(export_segment(scene, segmentation, segment_id, volume), before)
    assert removed == [2] and len(logic.session.clicks) == 1
