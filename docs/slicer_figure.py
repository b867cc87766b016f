"""Draw docs/slicer-workflow.png: the Slicer module's Logic on a real slicer-core MRML scene.

A BraTS FLAIR test case (``../shared/data``, with the brain model) or, until that model is
shipped, a synthetic image (with the demo model) is put into a scalar volume node, the Logic is driven with clicks exactly as the Widget drives it, and the segment
is read back from the segmentation node; matplotlib then draws it the way a slice view shows
it. Run: ``python docs/slicer_figure.py`` (needs slicer-core and a shipped model).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "Testing" / "Python")]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import slicer  # noqa: E402
import slicer_test_doubles  # noqa: E402
import vtk  # noqa: E402

import importlib.util  # noqa: E402

slicer_test_doubles.install(tempfile.mkdtemp())
spec = importlib.util.spec_from_file_location("OAIMSSegment", REPO / "OAIMSSegment.py")
module = importlib.util.module_from_spec(spec)
sys.modules["OAIMSSegment"] = module
spec.loader.exec_module(module)
from OAIMSSegment import mrml  # noqa: E402
from OAIMSSegment.model import list_models  # noqa: E402

DATA = REPO.parent / "shared" / "data"
names = [c.name for c in list_models()]
brats = DATA / "Dataset001_BraTS18_FLAIR"
if "brain-lesion-flair" in names and brats.is_dir():
    # The real case: a BraTS FLAIR test subject with the brain model.
    model, case = "brain-lesion-flair", "Brats18_CBICA_AQN_1"
    image = sitk.ReadImage(str(brats / "imagesTs" / f"{case}_0000.nii.gz"))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(brats / "labelsTs" / f"{case}.nii.gz")))
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    spacing, title = image.GetSpacing(), f"{case}, FLAIR"
else:
    # No brain model shipped yet: the demo model on synthetic images of its own kind.
    from OAIMSSegment.data import synthetic_samples

    model = "demo-synthetic-blobs"
    samples = synthetic_samples(8, "source", seed=4)
    voxels = np.stack([s.image[0] for s in samples])
    truth = np.stack([s.label for s in samples])
    spacing, title = (0.8, 0.8, 3.0), "synthetic image"
k = int(np.argmax((truth > 0).sum(axis=(1, 2))))  # the axial slice with the most target

scene = slicer.mrmlScene
volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
data = vtk.vtkImageData()
data.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
data.AllocateScalars(vtk.VTK_FLOAT, 1)
volume.SetAndObserveImageData(data)
mrml.volume_array(volume)[:] = voxels
volume.SetSpacing(*spacing)
volume.SetOrigin(-120.0, -120.0, -77.0)
volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)  # LPS file -> RAS
segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")

logic = module.OAIMSSegmentLogic(storeFolder=tempfile.mkdtemp())
logic.setModel(model)
logic.setSite("radiology-3T")
(segment_id,) = logic.startSegment(volume, segmentation).values()


def world(i, j):
    return (mrml.ijk_to_world(volume) @ np.array([i, j, k, 1.0]))[:3]


rows, cols = np.nonzero(truth[k] > 0)
centre = (int(np.median(cols)), int(np.median(rows)))
clicks = [(centre, True)]
report = logic.addClick(world(*centre), True, "Axial")
location = mrml.locate_click(volume, world(*centre), "Axial")
# Correction clicks where the segment is most wrong, as a clinician would place them.
from OAIMSSegment.clicks import correction_click  # noqa: E402

for _ in range(3):
    current = mrml.read_slice_mask(segmentation, segment_id, volume, location).astype(np.uint8)
    click = correction_click(current, (truth[k] > 0).astype(np.uint8), 2)
    if click is None:
        break
    ij = (click.position[1], click.position[0])
    clicks.append((ij, bool(click.label)))
    report = logic.addClick(world(*ij), bool(click.label), "Axial")
accepted = logic.accept()
info = logic.siteModelInfo()
segment = mrml.read_slice_mask(segmentation, segment_id, volume, location)

fig, (view, panel) = plt.subplots(1, 2, figsize=(10, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
fig.patch.set_facecolor("#20242a")
view.imshow(voxels[k], cmap="gray", origin="lower")
view.contourf(segment, levels=[0.5, 1.5], colors=["#f1c232"], alpha=0.35, origin="lower")
view.contour(segment, levels=[0.5], colors=["#f1c232"], linewidths=1.5, origin="lower")
view.contour(truth[k] > 0, levels=[0.5], colors=["#5bc0de"], linewidths=1, linestyles="--", origin="lower")
for (i, j), positive in clicks:
    view.plot(i, j, "o", ms=8, mfc="#39d353" if positive else "#e5534b", mec="white")
view.set_title(f"Red slice view: axial slice {k} ({title})", color="white", fontsize=10)
view.axis("off")
view.set_facecolor("black")
panel.axis("off")
lines = [
    ("OAIMS Segment", 13, "bold"),
    (f"Model: {model}", 10, "normal"),
    (f"Site: {info['site']}   version {info['version']}   images adapted: {info['imagesAdapted']}", 10, "normal"),
    ("", 6, "normal"),
    (f"Clicks on this slice: {len(clicks)}  (green = foreground, red = background)", 10, "normal"),
    (f"Last click: {report['latencyMs']:.0f} ms  (MI update {report['adaptMs']:.0f} ms)", 10, "normal"),
    (f"Accept: PI {'applied' if accepted['applied'] else 'not applied'} in {accepted['latencyMs']:.0f} ms", 10, "normal"),
    *([(f"  ({accepted['reason']})", 8, "normal")] if accepted["reason"] else []),
    (f"  {accepted['message']}", 9, "normal"),
    ("", 6, "normal"),
    ("yellow: segment written to the segmentation node", 9, "normal"),
    ("dashed blue: reference mask", 9, "normal"),
    ("", 6, "normal"),
    ("Drawn from a real slicer-core MRML scene by docs/slicer_figure.py", 8, "italic"),
]
y = 0.95
for text, size, style in lines:
    panel.text(0.0, y, text, color="white", fontsize=size, fontweight="bold" if style == "bold" else "normal",
               fontstyle="italic" if style == "italic" else "normal", transform=panel.transAxes, va="top")
    y -= 0.065 if size > 6 else 0.03
fig.tight_layout()
fig.savefig(REPO / "docs" / "slicer-workflow.png", dpi=110, facecolor=fig.get_facecolor())
print("wrote docs/slicer-workflow.png", model, info, accepted["message"])
