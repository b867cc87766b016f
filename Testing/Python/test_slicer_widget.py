"""The Widget's behaviour without Qt (issue 18 item 7): ``OAIMSSegment/panel.py`` on real MRML (slicer-core).

What the Widget did itself before (the model change, the site list, what is enabled while a job runs, the
status line, install polling, the accept warning, New segmentation, which point list a click belongs to,
discard's question, the scene closing) is driven here through :class:`Panel`. The stand-ins are those of
``slicer_test_doubles.py`` (its ``SegmentEditorWidget`` over a real Segment Editor node) and, labelled
below, the recorded Qt calls of :class:`~OAIMSSegment.panel.Gui`.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slicer_module import REPO, add_volume, ball_volume, binary_model, module, scene, world_of  # noqa: E402,F401

import slicer_test_doubles  # noqa: E402
from OAIMSSegment import dependencies, mrml  # noqa: E402
from OAIMSSegment.module_state import CONTROLS, RESTART_QUESTION, SHORTCUTS  # noqa: E402
from OAIMSSegment.panel import (DISCARD_QUESTION, SIGNAL_ARG, SIGNALS, Gui, Panel, Read,  # noqa: E402
                                slot_arguments)
from OAIMSSegment.runner import JobRunner  # noqa: E402

#: Controls the Widget adds to ``ui`` besides the ``.ui`` file's (see ``OAIMSSegmentWidget.setup``).
ADDED_CONTROLS = {"segmentEditorWidget", "newSegmentationButton", "siteLineEdit", "storeLineEdit", "storeBrowseButton"}


class Recorded:
    """TEST DOUBLE of the Widget's Qt calls (``panel.Gui``: dialogs, place mode, timer, status line): each call
    is appended to ``calls``; questions are answered with ``answer`` and file dialogs with ``path``."""

    def __init__(self) -> None:
        self.calls: list = []
        self.answer, self.path, self.ticks = True, "", []

    def gui(self) -> Gui:
        record = lambda name, result=None: lambda *args: self.calls.append((name, *args)) or result  # noqa: E731
        return Gui(status=record("status"), ask=lambda text: self.calls.append(("ask", text)) or self.answer,
                   askYesNo=lambda text: self.calls.append(("askYesNo", text)) or self.answer, warn=record("warn"),
                   askPath=lambda *args: self.calls.append(("askPath", *args)) or self.path, place=record("place"),
                   showPoints=record("showPoints"), every=lambda ms, tick: self.ticks.append(tick) or (lambda: self.calls.append(("stop",))),
                   restart=record("restart"), show=record("show"))

    def named(self, name: str) -> list:
        return [call[1:] for call in self.calls if call[0] == name]


@pytest.fixture()
def panel(module, scene, binary_model, tmp_path):
    """A Panel on a fresh scene with a ball volume shown in a slice view and the tiny model listed."""
    recorded = Recorded()
    logic = module.OAIMSSegmentLogic(storeFolder=str(tmp_path / "sites"))
    editor = slicer_test_doubles.SegmentEditorWidget(mrml.segment_editor_node(scene))
    panel = Panel(logic, JobRunner(pump=lambda: None), editor, recorded.gui(), scene)
    panel.setup(None)
    panel.models.append(("tiny-binary: test", binary_model))  # as a shipped card would be listed
    volume = add_volume(scene, ball_volume(), np.eye(4), "MRI")
    scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetBackgroundVolumeID(volume.GetID())
    yield panel, recorded, volume
    panel.cleanup()


def test_choosing_a_model_lists_its_classes_and_shows_its_settings_once(panel):
    panel, recorded, volume = panel
    first = panel.changes()
    assert first["modelComboBox"]["items"][0] == ("(select a model)", "") and first["classComboBox"]["items"] == []
    assert first["busyProgressBar"] == {"visible": False} and first["acceptButton"] == {"enabled": False}
    assert "sigmaSpinBox" not in first and panel.changes() == {}  # nothing written twice
    panel.logic.setAdaptation(sigma=4.5)
    panel.chooseModel(len(panel.models) - 1)
    shown = panel.changes()
    assert shown["classComboBox"] == {"items": [("lesion", 1)], "enabled": True}
    settings = panel.logic.adaptationSettings()
    assert shown["sigmaSpinBox"] == {"value": 4.5} and shown["lrSpinBox"] == {"value": settings["lr"]}
    assert shown["miCheckBox"] == {"checked": True} and shown["foregroundPlaceWidget"] == {"enabled": True}
    assert "modelComboBox" not in shown  # refilling it would lose the choice
    panel.adapt("lr", 3e-4)
    assert panel.changes() == {"lrSpinBox": {"value": 3e-4}}  # in force now (no segment open): what the box holds
    panel.chooseModel(0)  # the placeholder: nothing happens
    assert panel.logic.card is not None and panel.changes() == {}


def test_site_list_commits_and_store_relisting(panel, tmp_path):
    panel, recorded, _ = panel
    shown = panel.changes()["siteComboBox"]
    assert shown == {"items": [("default", "default")], "currentText": "default"}
    panel.commitSite("radiology")
    assert panel.logic.siteName == "radiology" and panel.changes()["siteComboBox"] == {"currentText": "radiology"}
    panel.commitStore(str(tmp_path / "shared"))  # a new store: the list is read again and its text put back
    assert panel.logic.storeFolder == str(tmp_path / "shared")
    assert panel.changes()["siteComboBox"] == {"items": [("default", "default"), ("radiology", "radiology")], "currentText": "radiology"}


def test_new_segmentation_sets_segmentation_before_volume_and_starts_the_segment(panel, scene):
    panel, recorded, volume = panel
    panel.chooseModel(len(panel.models) - 1)
    panel.enter()  # no segmentation yet: the editor would refuse a source volume, none is forced on it
    assert panel.editor.refused == 0 and panel.editor.sourceVolumeNode() is None
    assert [call[0] for call in recorded.named("showPoints")] == [True, False]
    panel.newSegmentation()  # on the volume the views show
    segmentation, segment_id = panel.editor.segmentationNode(), panel.editorNode.GetSelectedSegmentID()
    assert panel.editor.refused == 0 and panel.editor.sourceVolumeNode() is volume
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "lesion"
    # The editor node's events started the segment (through the observer, then the widgets were shown).
    assert (panel.logic.volumeNode, panel.logic.segmentationNode, panel.logic.segmentId) == (volume, segmentation, segment_id)
    assert recorded.named("show")
    scene.RemoveNode(volume)
    panel.editor.node.SetAndObserveSourceVolumeNode(None)
    scene.RemoveNode(scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode"))
    panel.newSegmentation()
    assert "Load the volume to segment first" in recorded.named("status")[-1][0]


def test_enter_starts_at_the_shown_volume_once_a_segmentation_is_selected(panel, scene):
    panel, recorded, volume = panel
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    panel.editor.setSegmentationNode(segmentation)
    panel.enter()
    assert panel.editor.sourceVolumeNode() is volume and panel.editor.refused == 0


def test_points_placed_in_either_list_become_clicks_and_a_refused_one_goes(panel, scene):
    panel, recorded, volume = panel
    panel.chooseModel(len(panel.models) - 1)
    panel.newSegmentation()
    panel.act("foreground")
    assert recorded.named("place") == [(True, True)]
    foreground, background = panel.points.ensure(True), panel.points.ensure(False)
    foreground.AddControlPoint(world_of(volume, (28, 32, 20)))
    assert foreground.GetNthControlPointLocked(0) and len(panel.logic.session.clicks) == 1
    background.AddControlPoint(world_of(volume, (6, 6, 20)))
    assert [c.label for c in panel.logic.session.clicks] == [1, 0]  # the background list gives a background click
    assert panel.controller.last["clicks"] == 2 and "2 click(s)" in recorded.named("status")[-1][0]
    background.AddControlPoint(world_of(volume, (500, 6, 20)))  # outside the volume: refused, its marker goes
    assert background.GetNumberOfControlPoints() == 1 and "outside volume" in recorded.named("status")[-1][0]
    assert panel.changes()["acceptButton"] == {"enabled": True}
    scene.RemoveNode(foreground)  # a deleted list is made again on the next use
    assert panel.points.ensure(True) is not foreground and panel.points.ensure(True).GetScene() is scene


def test_controls_are_disabled_and_the_busy_bar_shown_while_a_job_runs(panel):
    panel, recorded, volume = panel
    panel.chooseModel(len(panel.models) - 1)
    panel.newSegmentation()
    panel.changes()
    during: list = []

    def pump():  # the Widget's: show the changes; a site box losing focus to a disabled control commits it
        if not during:
            during.append(panel.changes())
            panel.commitSite("radiology")
    panel.runner._pump, panel.runner._wait_s = pump, 0.0005
    panel.controller.click(world_of(volume, (28, 32, 20)), True, "Axial")
    assert during and during[0]["busyProgressBar"] == {"visible": True}
    # The commit waited for the job, then took effect: the click's segment is kept without adapting.
    assert panel.logic.siteName == "radiology" and not any("wait for" in s[0] for s in recorded.named("status"))
    assert panel.logic.workedSlices == [] and panel.controller.last["clicks"] == 1
    assert during[0]["modelComboBox"] == {"enabled": False} and during[0]["foregroundPlaceWidget"] == {"enabled": False}
    assert during[0]["segmentEditorWidget"] == {"enabled": False}  # volume, segmentation and segment wait too
    assert "siteInfoLabel" not in during[0]  # nothing but what is enabled is read while the worker runs
    after = panel.changes()
    assert after["busyProgressBar"] == {"visible": False} and after["foregroundPlaceWidget"] == {"enabled": True}


def test_accept_warns_when_not_saved_and_discard_asks(module, scene, binary_model, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store folder should be")
    recorded = Recorded()
    logic = module.OAIMSSegmentLogic(storeFolder=str(blocker / "sites"))
    panel = Panel(logic, JobRunner(pump=lambda: None), slicer_test_doubles.SegmentEditorWidget(mrml.segment_editor_node(scene)),
                  recorded.gui(), scene)
    panel.setup(None)
    panel.models.append(("tiny", binary_model))
    volume = add_volume(scene, ball_volume(), np.eye(4))
    scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetBackgroundVolumeID(volume.GetID())
    panel.chooseModel(len(panel.models) - 1)
    panel.newSegmentation()
    for ijk, positive in (((28, 32, 20), True), ((5, 5, 20), False)):
        panel.controller.click(world_of(volume, ijk), positive, "Axial")
    panel.act("accept")
    assert len(recorded.named("warn")) == 1 and "NOT saved" in recorded.named("warn")[0][0]
    location = mrml.locate_click(volume, world_of(volume, (28, 32, 18)), "Axial")  # a slice the accepted segment left empty
    panel.controller.click(world_of(volume, (28, 32, 18)), True, "Axial")
    assert mrml.read_slice_mask(logic.segmentationNode, logic.segmentId, volume, location).any()
    recorded.answer = True  # Yes: also erase what the clicks drew
    panel.act("discard")
    assert recorded.named("askYesNo") == [(DISCARD_QUESTION,)] and not logic.workedSlices
    assert not mrml.read_slice_mask(logic.segmentationNode, logic.segmentId, volume, location).any()
    panel.act("discard")  # nothing worked on: nothing asked
    assert len(recorded.named("askYesNo")) == 1
    panel.cleanup()


def test_install_asks_polls_and_offers_a_restart(panel, monkeypatch):
    panel, recorded, _ = panel
    monkeypatch.setattr(panel.logic, "missingDependencies", lambda: ["monai"])
    monkeypatch.setattr(panel.logic, "installInBackground",
                        lambda: dependencies.BackgroundProcess([sys.executable, "-c", "print('Collecting monai')"]))
    panel.models.insert(1, ("Install dependencies and list models...", "__install__"))
    recorded.answer = False
    panel.chooseModel(1)
    assert recorded.named("ask")[-1][0].startswith("Install monai?") and not recorded.ticks  # declined: nothing runs
    recorded.answer = True
    panel.chooseModel(1)
    deadline = time.monotonic() + 60
    while ("stop",) not in recorded.calls:
        assert time.monotonic() < deadline
        recorded.ticks[0]()  # the 200 ms timer
        time.sleep(0.01)
    assert ("status", "Collecting monai") in recorded.calls and recorded.named("ask")[-1] == (RESTART_QUESTION,)
    assert recorded.named("restart") == [()]


def test_scene_close_ends_place_mode_and_forgets_the_segment(panel, scene):
    panel, recorded, volume = panel
    panel.chooseModel(len(panel.models) - 1)
    panel.newSegmentation()
    panel.controller.click(world_of(volume, (28, 32, 20)), True, "Axial")
    assert panel.changes()["acceptButton"] == {"enabled": True}
    scene.Clear(0)
    assert recorded.named("place")[-2:] == [(True, False), (False, False)]
    assert panel.logic.volumeNode is None and panel.controller.steps == []
    assert panel.changes()["acceptButton"] == {"enabled": False}


def test_signal_table_names_real_controls_panel_methods_and_arguments():
    ui_names = {w.get("name"): w.get("class") for w in ET.parse(REPO / "Resources" / "UI" / "OAIMSSegment.ui").iter("widget")}
    source = (REPO / "OAIMSSegment.py").read_text()
    widget = source[source.index("class OAIMSSegmentWidget"):source.index("class OAIMSSegmentTest")]
    for name in ADDED_CONTROLS:  # assigned in setup()
        assert re.search(rf"\bui\.{name}\b[^=\n]*= ", widget), name
    for control, signal, method, arguments in SIGNALS:
        assert control in ui_names or control in ADDED_CONTROLS, control
        assert re.fullmatch(r"\w+\((int|bool|double|)\)", signal), signal
        parameters = inspect.signature(getattr(Panel, method)).parameters
        assert len(parameters) - 1 == len(arguments), (method, arguments)  # self + one per argument
        assert all(a.control in ui_names for a in arguments if isinstance(a, Read)), arguments
    names = {name for _, name, _ in SHORTCUTS}
    actions = {row[3][0] for row in SIGNALS if row[2] == "act"}
    assert names >= actions and {n for group in CONTROLS.values() for n in group} <= set(ui_names) | ADDED_CONTROLS
    ui = types.SimpleNamespace(siteComboBox=types.SimpleNamespace(currentText="radiology"))
    assert slot_arguments(("sigma", SIGNAL_ARG), (4.5,), lambda name: getattr(ui, name)) == ["sigma", 4.5]
    assert slot_arguments((Read("siteComboBox", "currentText"),), (2,), lambda name: getattr(ui, name)) == ["radiology"]


def test_every_shortcut_has_a_panel_action(panel):
    panel, *_ = panel
    assert set(panel.actions) == {name for _, name, _ in SHORTCUTS}


# -- the Widget itself, built against the labelled Qt doubles ------------------------------------------


@pytest.fixture()
def widget(module, scene, binary_model, monkeypatch):
    """``OAIMSSegmentWidget.setup()`` of the module loaded as Slicer loads it, on the Qt doubles of
    ``slicer_test_doubles.qt_widgets`` (widgets built from the real ``.ui`` file) and a real scene."""
    import slicer

    store: dict = {}
    for target, values in slicer_test_doubles.qt_widgets(store).items():
        for name, value in values.items():
            monkeypatch.setattr(sys.modules[target] if target == "qt" else slicer, name, value, raising=False)
    built = module.OAIMSSegmentWidget()
    built.setup()
    built.panel.models.append(("tiny-binary: test", binary_model))
    yield built, store
    built.cleanup()


def test_widget_setup_connects_every_signal_and_shortcut_and_shows_the_panel(widget, scene):
    built, store = widget
    ui = built.ui
    for control, signal, _, _ in SIGNALS:
        assert getattr(ui, control)._slots.get(signal), (control, signal)
    assert [s.key for s in built._shortcuts] == [key for key, _, _ in SHORTCUTS] and not any(s.enabled for s in built._shortcuts)
    assert ui.modelComboBox.items[0] == ("(select a model)", "") and ui.siteComboBox.currentText == "default"
    assert not ui.acceptButton.enabled and not ui.busyProgressBar.visible and ui.siteInfoLabel.text.startswith("Site 'default'")
    assert ui.storeFolderPathLineEdit.currentPath == built.logic.storeFolder
    assert built.editor.node is mrml.segment_editor_node(scene) and not built.editor.undoEnabled and ui.segmentEditorWidget.enabled
    built.enter()
    assert all(s.enabled for s in built._shortcuts)
    assert [call[0] for call in ui.foregroundPlaceWidget.calls] == ["setMRMLScene", "setCurrentNode"]


def test_widget_signals_drive_the_panel_end_to_end(widget, scene):
    built, store = widget
    ui = built.ui
    volume = add_volume(scene, ball_volume(), np.eye(4), "MRI")
    scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode").SetBackgroundVolumeID(volume.GetID())
    built.enter()
    ui.modelComboBox.emit("currentIndexChanged(int)", len(built.panel.models) - 1)
    assert built.logic.card is not None and ui.classComboBox.items == [("lesion", 1)]
    ui.sigmaSpinBox.emit("valueChanged(double)", 4.0)
    assert built.logic.adaptationSettings()["sigma"] == 4.0
    ui.newSegmentationButton.emit("clicked(bool)", False)
    assert built.logic.segmentId == built.editor.node.GetSelectedSegmentID() and built.logic.volumeNode is volume
    next(s for s in built._shortcuts if s.key == "A").emit("activated()")
    assert ui.foregroundPlaceWidget.calls[-1] == ("setPlaceModeEnabled", True)
    built.panel.points.ensure(True).AddControlPoint(world_of(volume, (28, 32, 20)))
    assert "1 click(s)" in ui.statusLabel.text and ui.undoButton.enabled and ui.acceptButton.enabled
    ui.undoButton.emit("clicked(bool)", False)
    assert built.logic.session.clicks == [] and not ui.undoButton.enabled
    ui.siteComboBox.currentText = "radiology"  # typed: nothing happens until the line edit's editingFinished
    assert built.logic.siteName == "default"
    ui.siteLineEdit.emit("editingFinished()")
    assert built.logic.siteName == "radiology" and store == {"OAIMSSegment/Site": "radiology"}
    built.exit()
    assert ui.foregroundPlaceWidget.calls[-1] == ("setPlaceModeEnabled", False) and not any(s.enabled for s in built._shortcuts)
