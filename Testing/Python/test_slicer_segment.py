"""Issue 18 on real MRML (slicer-core): a segment is drawn over several slices, edits are the truth,
nothing is trained or saved before Accept, and the panel's behaviour (PanelController) without Qt.

The only stand-ins are those of ``slicer_test_doubles.py`` plus, labelled below, a Segment Editor
undo adapter over Slicer's real ``vtkSegmentationHistory`` (the class ``qMRMLSegmentEditorWidget``
keeps its undo states in; the widget itself is Qt).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import slicer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slicer_module import (REPO, add_volume, ball_volume, binary_model, engine_replay, module, scene,  # noqa: E402,F401
                                world_of)

from OAIMSSegment import mrml  # noqa: E402
from OAIMSSegment.errors import InvalidClickError  # noqa: E402
from OAIMSSegment.module_state import EditorUndo, Marker, PanelController  # noqa: E402
from OAIMSSegment.runner import JobRunner  # noqa: E402


def weights(logic) -> dict:
    return {k: v.clone() for k, v in logic.session.model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all((a[k] == b[k]).all() for k in a)


def slice_of(segmentation, segment_id, volume, ijk) -> np.ndarray:
    return mrml.read_slice_mask(segmentation, segment_id, volume, mrml.locate_click(volume, world_of(volume, ijk), "Axial"))


@pytest.fixture()
def setup(module, scene, binary_model, tmp_path):
    volume = add_volume(scene, ball_volume(), np.eye(4))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    logic = module.OAIMSSegmentLogic(storeFolder=str(tmp_path / "sites"))
    logic.setModel(binary_model)
    mrml.prepare_segmentation(segmentation, volume)  # registers Slicer's labelmap converters, as the app does
    segment_ids = [segmentation.GetSegmentation().AddEmptySegment("", name) for name in ("Tumor", "Edema")]
    logic.startSegment(volume, segmentation, segment_ids[0])
    return logic, volume, segmentation, segment_ids


class HistoryEditor:
    """TEST DOUBLE of the embedded qMRMLSegmentEditorWidget's undo (Qt): the calls the widget makes
    (saveStateForUndo -> SaveState, undo -> RestorePreviousState) on a real vtkSegmentationHistory."""

    def __init__(self, segmentation_node) -> None:
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetMaximumNumberOfStates(10)
        self.history.SetSegmentation(segmentation_node.GetSegmentation())

    def saveStateForUndo(self) -> None:
        self.history.SaveState()

    def undo(self) -> None:
        self.history.RestorePreviousState()


# -- defect 4: silent training -------------------------------------------------------------------


def test_moving_on_or_switching_segment_trains_and_saves_nothing(setup):
    logic, volume, segmentation, (tumor, edema) = setup
    before = weights(logic)
    logic.addClick(world_of(volume, (28, 32, 20)), True)
    logic.addClick(world_of(volume, (6, 6, 20)), False)
    first = slice_of(segmentation, tumor, volume, (0, 0, 20))
    report = logic.addClick(world_of(volume, (28, 32, 18)), True)  # another slice: goes on
    assert report["newImage"] and logic.workedSlices == [(2, 20), (2, 18)]
    assert logic.siteModelInfo()["version"] == 0 and logic.siteModelInfo()["versions"] == []
    np.testing.assert_array_equal(slice_of(segmentation, tumor, volume, (0, 0, 20)), first)  # kept
    # Defect 6: another segment takes effect at once; the one left keeps its slices, not adapted.
    controller = PanelController(logic, JobRunner(pump=lambda: None))
    assert controller.selectInputs(volume, segmentation, edema)
    assert same(weights(logic), before) and logic.siteModelInfo()["versions"] == []
    np.testing.assert_array_equal(slice_of(segmentation, tumor, volume, (0, 0, 20)), first)
    controller.click(world_of(volume, (28, 32, 20)), True, "Axial")
    assert controller.last["foregroundPixels"] == int(slice_of(segmentation, edema, volume, (0, 0, 20)).sum())
    np.testing.assert_array_equal(slice_of(segmentation, tumor, volume, (0, 0, 20)), first)  # not written into
    assert not controller.selectInputs(volume, segmentation, edema)  # the same inputs change nothing


def test_scene_close_and_node_deletion_keep_the_segment_without_adapting(setup, scene):
    logic, volume, segmentation, (tumor, _) = setup
    controller = PanelController(logic, JobRunner(pump=lambda: None))
    stop = mrml.observe_scene(scene, controller.sceneClosing, controller.nodeRemoved)
    before = weights(logic)
    for ijk, positive in (((28, 32, 20), True), ((6, 6, 20), False)):
        controller.click(world_of(volume, ijk), positive, "Axial")
    held = slice_of(segmentation, tumor, volume, (0, 0, 20))
    scene.RemoveNode(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unrelated"))
    assert logic.workedSlices == [(2, 20)]  # an unrelated node goes without effect
    scene.RemoveNode(volume)
    assert logic.volumeNode is None and logic.workedSlices == []
    assert same(weights(logic), before) and logic.siteModelInfo()["versions"] == []
    np.testing.assert_array_equal(mrml.read_slice_mask(segmentation, tumor, volume, mrml.SliceLocation(
        2, 20, (0, 0, 20), (0, 0), held.shape)), held)
    logic.startSegment(add_volume(scene, ball_volume(), np.eye(4)), segmentation, tumor)
    controller.click(world_of(logic.volumeNode, (28, 32, 20)), True, "Axial")
    scene.Clear(0)
    assert logic.segmentationNode is None and logic.siteModelInfo()["versions"] == []
    stop()


# -- defect 2: the clinician's edits are the truth -------------------------------------------------


def test_a_new_click_keeps_paint_and_erase_and_accept_learns_from_the_final_slice(setup):
    logic, volume, segmentation, (tumor, _) = setup
    location = mrml.locate_click(volume, world_of(volume, (28, 32, 20)), "Axial")
    first = logic.addClick(world_of(volume, (28, 32, 20)), True)
    predicted = mrml.read_slice_mask(segmentation, tumor, volume, location)
    assert predicted.any() and (~predicted).any(), first
    rows, cols = np.nonzero(predicted)
    erased = (rows[0], cols[0])  # a pixel the model predicted, erased by the clinician
    painted = (2, 2)  # a pixel far from the prediction, painted
    assert not predicted[painted]
    edited = predicted.copy()
    edited[erased], edited[painted] = False, True
    mrml.write_slice_mask(segmentation, volume, location, edited.astype(np.uint8), {1: tumor})  # the Paint/Erase effects
    far = max(((r, c) for r in (5, 58) for c in (5, 50)), key=lambda p: min(abs(p[0] - erased[0]) + abs(p[1] - erased[1]),
                                                                            abs(p[0] - 2) + abs(p[1] - 2)))
    logic.addClick(world_of(volume, (far[1], far[0], 20)), False)
    after = mrml.read_slice_mask(segmentation, tumor, volume, location)
    assert after[painted] and not after[erased]
    # A click at a painted pixel asks for its prediction there: the edit gives way within the radius.
    logic.addClick(world_of(volume, (painted[1], painted[0], 20)), False)
    assert mrml.read_slice_mask(segmentation, tumor, volume, location)[painted] == (logic.session.mask[painted] == 1)
    mrml.write_slice_mask(segmentation, volume, location, np.pad(np.ones((4, 4), np.uint8), ((40, 20), (40, 12))), {1: tumor})
    final = mrml.read_slice_mask(segmentation, tumor, volume, location)
    accepted = logic.accept()
    assert accepted["slices"] == [{"sliceIndex": 20, "sliceAxis": "K", "acceptedPixels": int(final.sum()), "applied": True,
                                   "reason": ""}], accepted
    assert accepted["saved"] and accepted["version"] == 1 and set(accepted) >= {"version", "saved", "message", "slices"}


def test_writing_a_slice_touches_only_the_pixels_that_change(setup):
    logic, volume, segmentation, (tumor, edema) = setup
    location = mrml.locate_click(volume, world_of(volume, (0, 0, 20)), "Axial")
    mask = np.zeros(location.shape, np.uint8)
    mask[10:20, 10:20] = 1
    mrml.write_slice_mask(segmentation, volume, location, mask, {1: tumor})
    labelmap = segmentation.GetSegmentation().GetSegment(tumor).GetRepresentation("Binary labelmap")
    stamp = labelmap.GetMTime()
    mrml.write_slice_mask(segmentation, volume, location, mask, {1: tumor})  # nothing changes: nothing written
    assert labelmap.GetMTime() == stamp
    mask[10:12] = 0
    mrml.write_slice_mask(segmentation, volume, location, mask, {1: tumor})
    np.testing.assert_array_equal(mrml.read_slice_mask(segmentation, tumor, volume, location), mask == 1)


def test_ctrl_z_undoes_the_click_its_mi_update_and_its_write_a_later_paint_stroke_alone(setup):
    logic, volume, segmentation, (tumor, _) = setup
    states = EditorUndo(HistoryEditor(segmentation), lambda: mrml.segment_stamp(segmentation, tumor))
    controller = PanelController(logic, JobRunner(pump=lambda: None), states)
    location = mrml.locate_click(volume, world_of(volume, (0, 0, 20)), "Axial")
    removed = []
    controller.click(world_of(volume, (28, 32, 20)), True, "Axial", Marker(lambda: removed.append(1)))
    one, after_one = mrml.read_slice_mask(segmentation, tumor, volume, location), weights(logic)
    controller.click(world_of(volume, (6, 6, 20)), False, "Axial", Marker(lambda: removed.append(2)))
    assert not same(weights(logic), after_one)  # the second click took an MI step
    controller.undo()
    assert removed == [2] and len(logic.session.clicks) == 1 and same(weights(logic), after_one)
    np.testing.assert_array_equal(mrml.read_slice_mask(segmentation, tumor, volume, location), one)
    states.save()  # as the Paint effect does before it paints
    painted = one.copy()
    painted[0:3, 0:3] = True
    mrml.write_slice_mask(segmentation, volume, location, painted.astype(np.uint8), {1: tumor})
    controller.undo()  # undoes the stroke only
    assert len(logic.session.clicks) == 1 and removed == [2]
    np.testing.assert_array_equal(mrml.read_slice_mask(segmentation, tumor, volume, location), one)
    controller.undo()
    assert removed == [2, 1] and logic.session.clicks == []
    assert not mrml.read_slice_mask(segmentation, tumor, volume, location).any()
    # Accept takes every marker of the segment away, on all its slices.
    controller.click(world_of(volume, (28, 32, 20)), True, "Axial", Marker(lambda: removed.append(3)))
    controller.click(world_of(volume, (28, 32, 18)), True, "Axial", Marker(lambda: removed.append(4)))
    controller.accept()
    assert removed == [2, 1, 3, 4] and len(controller.last["slices"]) == 2


def test_one_button_makes_a_segmentation_and_segment_on_the_editor_singleton(module, scene):
    volume = add_volume(scene, ball_volume((4, 16, 16)), np.eye(4), "MRI")
    other = add_volume(scene, ball_volume((4, 16, 16)), np.eye(4), "CT")
    assert mrml.shown_volume(scene) is None  # no view shows a volume yet: the inputs stay empty
    red, yellow = (scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(2))
    red.SetForegroundVolumeID(other.GetID())
    assert mrml.shown_volume(scene) is other  # only a foreground volume is shown
    yellow.SetBackgroundVolumeID(volume.GetID())
    assert mrml.shown_volume(scene) is volume  # a background volume comes first, as in the Segment Editor
    editor = mrml.segment_editor_node(scene)
    assert mrml.segment_editor_node(scene) is editor and editor.GetSingletonTag() == "SegmentEditor"
    segmentation, segment_id = mrml.new_segmentation(scene, volume, "lesion")
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "lesion"
    assert segmentation.GetDisplayNode() is not None


# -- defect 5: races; defect 3: fields -------------------------------------------------------------


def test_clicks_placed_while_a_job_runs_wait_and_join_the_same_image(setup):
    logic, volume, segmentation, (tumor, _) = setup
    events: list = []
    runner = JobRunner(pump=lambda: [events.pop(0)() for _ in list(events)], wait_s=0.0005)
    controller = PanelController(logic, runner)
    assert controller.enabled()["place"] and not controller.enabled()["accept"]
    seen = []
    events.append(lambda: seen.append(controller.enabled()))  # the panel refreshes while the job runs
    events.append(lambda: controller.click(world_of(volume, (6, 6, 20)), False, "Axial"))
    events.append(lambda: controller.accept())
    controller.click(world_of(volume, (28, 32, 20)), True, "Axial")
    assert seen and not any(seen[0].values()), seen  # nothing enabled while the job runs
    assert controller.last["version"] == 1 and controller.last["slices"][0]["sliceIndex"] == 20
    assert controller.last["clicks"] == 2  # one image with both clicks, accepted after them


def test_a_point_placed_right_after_accept_starts_the_next_segment_and_undo_takes_its_own_marker(setup):
    logic, volume, *_ = setup
    removed: list = []
    controller = PanelController(logic, JobRunner(pump=lambda: None))
    controller.click(world_of(volume, (28, 32, 20)), True, "Axial", Marker(lambda: removed.append("first")))
    controller.accept()
    assert removed == ["first"] and controller.last["version"] == 1
    controller.click(world_of(volume, (28, 32, 20)), True, "Axial", Marker(lambda: removed.append("second")))
    assert controller.last["newImage"] and controller.last["clicks"] == 1  # a new image, not a failure
    controller.undo()
    assert removed == ["first", "second"] and logic.session.clicks == []
    controller.click(world_of(volume, (500, 500, 20)), True, "Axial", Marker(lambda: removed.append("outside")))
    assert removed[-1] == "outside" and controller.steps == []  # a refused point goes, undo has nothing to take


def test_site_and_store_fields_act_on_commit_and_create_nothing_while_typing(setup, tmp_path):
    logic, *_ = setup
    controller = PanelController(logic, JobRunner(pump=lambda: None))
    assert controller.site.commit("radiology") and not controller.site.commit("radiology")  # Enter then focus-out
    assert not controller.site.commit("  ")
    assert logic.siteModelInfo()["site"] == "radiology"
    assert logic.sites() == ["default", "radiology"]
    shared = tmp_path / "shared-store"
    assert controller.store.commit(str(shared)) and logic.storeFolder == str(shared)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("s")] == ["shared-store", "sites"]


# -- defect 8: views, Python 3.9, packaging --------------------------------------------------------


def test_views_far_off_the_voxel_planes_are_refused(setup, scene):
    logic, volume, *_ = setup
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    for degrees, refused in ((6.0, False), (23.0, True)):
        t = np.deg2rad(degrees)
        red.SetSliceToRASByNTP(0.0, np.sin(t), np.cos(t), 1.0, 0.0, 0.0, 28.0, 32.0, 20.0, 0)
        if refused:
            with pytest.raises(InvalidClickError, match="23 degrees off the voxel planes"):
                logic.prepareClick(world_of(volume, (28, 32, 20)), True, red)
        else:
            assert mrml.locate_click(volume, world_of(volume, (28, 32, 20)), red).axis == 2


def test_sagittal_and_coronal_slices_reach_the_model_at_isotropic_in_plane_spacing(module, scene, binary_model, tmp_path):
    voxels = ball_volume((10, 40, 36))
    volume = add_volume(scene, voxels, np.diag([1.0, 1.0, 4.0, 1.0]))  # 1 x 1 x 4 mm voxels
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    logic = module.OAIMSSegmentLogic(storeFolder=str(tmp_path / "sites"))
    logic.setModel(binary_model)
    (segment_id,) = logic.startSegment(volume, segmentation).values()
    initial = logic.session.state_dict()
    report = logic.addClick(world_of(volume, (18, 20, 5)), True, "Coronal")  # rows: K (4 mm), columns: I (1 mm)
    assert report["pixel"] == (5, 18)
    assert logic.session.prepared.original_shape == (40, 36)  # 10 rows of 4 mm -> 40 rows of 1 mm
    assert logic.session.clicks[0].position == (22, 18)  # the centre of row 5 is model row 22
    image = np.take(voxels, 20, axis=1)[np.newaxis]
    from scipy import ndimage

    model_image = ndimage.zoom(image, (1, 4, 1), order=1, mode="nearest", grid_mode=True)
    expected = engine_replay(binary_model, initial, model_image, [((22, 18), 1)])[2::4]  # sampled at row centres
    location = mrml.locate_click(volume, world_of(volume, (18, 20, 5)), "Coronal")
    np.testing.assert_array_equal(mrml.read_slice_mask(segmentation, segment_id, volume, location), expected == 1)
    assert logic.accept()["slices"][0]["acceptedPixels"] == int((expected == 1).sum())


def test_every_module_file_parses_as_python_3_9_and_the_repository_has_a_license():
    files = [REPO / "OAIMSSegment.py", *sorted((REPO / "OAIMSSegment").rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
    assert "Apache License" in (REPO / "LICENSE").read_text()


def test_pip_runs_in_a_background_process_with_the_installed_torch_pinned(monkeypatch):
    import time

    from OAIMSSegment import dependencies

    process = dependencies.BackgroundProcess([sys.executable, "-c", "print('one'); print('two')"])
    lines, code, deadline = [], None, time.monotonic() + 60
    while code is None and time.monotonic() < deadline:  # the caller (a QTimer in the panel) polls
        new, code = process.poll()
        lines += new
        time.sleep(0.01)
    assert lines == ["one", "two"] and code == 0
    seen: dict = {}
    monkeypatch.setattr(dependencies, "BackgroundProcess",
                        lambda command, on_exit: seen.update(command=command, pins=Path(command[-1]).read_text(), exit=on_exit))
    dependencies.pip_in_background("PythonSlicer", "requirements.txt")
    assert seen["command"][:7] == ["PythonSlicer", "-m", "pip", "install", "-r", "requirements.txt", "-c"]
    assert "torch==" in seen["pins"] and "numpy==" in seen["pins"]
    seen["exit"]()
    assert not Path(seen["command"][-1]).exists()  # the constraints file goes once pip is done
