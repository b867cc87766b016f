"""The MRML bridge: the only engine file that imports ``slicer`` (MRML) and ``vtk``.

It turns a click in a slice view into an engine image and a pixel, and an engine mask
back into segments, so that the Slicer Logic stays a thin conductor.

Coordinates
-----------
* A click arrives in **world RAS** (millimetres), as markups and slice views report it.
* ``world <- volume RAS`` is the volume's parent transform chain (linear only: a
  non-linearly transformed volume must be hardened first); ``volume RAS <- IJK`` is the
  volume's IJK-to-RAS matrix, which carries spacing, origin *and* the direction matrix
  (oblique and flipped axes included). Ignoring either is the classic "click lands on the
  wrong voxel" bug of other extensions.
* The slice is the plane of voxels through the clicked voxel that is normal to the IJK
  axis closest to the view normal (``Axial`` = world S, ``Coronal`` = A, ``Sagittal`` = R,
  or a slice node's actual normal, which may be oblique).
* The volume array is numpy-ordered ``[k, j, i(, c)]``. The 2D slice keeps the two other
  axes in that order: rows are the lower-numbered numpy axis. Axial (K-normal) slices are
  ``[j, i]``, which is how the engine's readers slice NIfTI volumes and how an RGB PNG loaded
  into Slicer (one slice, ``k = 0``) comes out: ``(H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from OAIMSSegment.errors import InvalidClickError, InvalidImageError

#: World-RAS normals of the three standard slice orientations.
ORIENTATION_NORMALS: dict[str, tuple[float, float, float]] = {
    "Axial": (0.0, 0.0, 1.0),
    "Coronal": (0.0, 1.0, 0.0),
    "Sagittal": (1.0, 0.0, 0.0),
}

#: A view whose normal is more than this many degrees from every voxel axis is refused (an oblique
#: reformat would be written into the nearest voxel plane, not where the clinician sees it).
MAX_OFF_PLANE_DEGREES = 10.0

#: What a caller may pass as a slice orientation: a name above or the slice node of the view.
Orientation = Union[str, "slicer.vtkMRMLSliceNode"]


@dataclass(frozen=True)
class SliceLocation:
    """Where a click is: which 2D slice of the volume, and which pixel of it.

    Attributes:
        axis: IJK axis normal to the slice (0 = I, 1 = J, 2 = K).
        index: voxel index of the slice along ``axis``.
        ijk: the clicked voxel ``(i, j, k)``.
        position: the clicked pixel ``(row, col)`` in the 2D slice array.
        shape: ``(H, W)`` of the 2D slice array.
    """

    axis: int
    index: int
    ijk: tuple[int, int, int]
    position: tuple[int, int]
    shape: tuple[int, int]

    def same_slice(self, other: "SliceLocation | None") -> bool:
        """True when ``other`` is a click on this very slice."""
        return other is not None and other.axis == self.axis and other.index == self.index

    @property
    def extent(self) -> tuple[int, int, int, int, int, int]:
        """VTK extent ``(i0, i1, j0, j1, k0, k1)`` of the slice's voxels."""
        rows_axis, cols_axis = _in_plane_axes(self.axis)
        size = {rows_axis: self.shape[0], cols_axis: self.shape[1]}
        bounds: list[int] = []
        for a in range(3):
            bounds += [self.index, self.index] if a == self.axis else [0, size[a] - 1]
        return tuple(bounds)  # type: ignore[return-value]


def _in_plane_axes(axis: int) -> tuple[int, int]:
    """IJK axes of a slice's rows and columns: the two others, in numpy order (higher IJK axis = rows)."""
    rows_axis, cols_axis = (a for a in (2, 1, 0) if a != axis)
    return rows_axis, cols_axis


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _parent_to_world(node: "slicer.vtkMRMLTransformableNode") -> np.ndarray:
    """4x4 matrix from the node's own RAS frame to world RAS (identity without a parent transform)."""
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(), None, matrix):
        raise InvalidImageError(
            f"'{node.GetName()}' is under a non-linear transform; harden the transform "
            "(Data module: right-click the transform, 'Harden transform') and try again"
        )
    return _matrix_to_numpy(matrix)


def ijk_to_world(volume_node: "slicer.vtkMRMLVolumeNode") -> np.ndarray:
    """4x4 matrix from the volume's voxel indices ``(i, j, k, 1)`` to world RAS (mm)."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return _parent_to_world(volume_node) @ _matrix_to_numpy(ijk_to_ras)


def world_to_ijk(volume_node: "slicer.vtkMRMLVolumeNode", ras: "np.ndarray | list[float]") -> np.ndarray:
    """Continuous voxel coordinates ``(i, j, k)`` of a world RAS point."""
    point = np.append(np.asarray(ras, dtype=float)[:3], 1.0)
    return (np.linalg.inv(ijk_to_world(volume_node)) @ point)[:3]


def view_normal(orientation: Orientation) -> np.ndarray:
    """Unit world-RAS normal of a view: ``'Axial'|'Coronal'|'Sagittal'`` or a slice node."""
    if isinstance(orientation, str):
        if orientation not in ORIENTATION_NORMALS:
            raise InvalidClickError(
                f"unknown slice orientation {orientation!r}; use one of {', '.join(ORIENTATION_NORMALS)} or a slice node"
            )
        return np.array(ORIENTATION_NORMALS[orientation])
    if orientation is None or not orientation.IsA("vtkMRMLSliceNode"):
        raise InvalidClickError("the slice orientation must be a name or a vtkMRMLSliceNode")
    normal = _matrix_to_numpy(orientation.GetSliceToRAS())[:3, 2]
    return normal / np.linalg.norm(normal)


def slice_axis(volume_node: "slicer.vtkMRMLVolumeNode", orientation: Orientation) -> int:
    """The volume's IJK axis (0 = I, 1 = J, 2 = K) whose world direction is closest to the view normal."""
    directions = ijk_to_world(volume_node)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0, keepdims=True)
    return int(np.argmax(np.abs(view_normal(orientation) @ directions)))


def off_plane_degrees(volume_node: "slicer.vtkMRMLVolumeNode", orientation: Orientation) -> float:
    """Angle (degrees) between the view normal and the closest voxel axis of the volume (as Slicer's
    ``qMRMLSegmentEditorWidget::updateSliceRotateWarningButtonVisibility`` compares slice and IJK axes)."""
    directions = ijk_to_world(volume_node)[:3, :3]
    directions = directions / np.linalg.norm(directions, axis=0, keepdims=True)
    cosine = float(np.max(np.abs(view_normal(orientation) @ directions)))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def observe_scene(scene: "slicer.vtkMRMLScene", on_close, on_node_removed):
    """Call ``on_close()`` when the scene starts closing and ``on_node_removed(node)`` before a node is
    deleted outside a close; returns a function that removes both observers."""

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def removed(caller, event, node=None):
        if not caller.IsClosing():  # a close is handled once, by on_close
            on_node_removed(node)

    tags = [scene.AddObserver(scene.StartCloseEvent, lambda caller, event: on_close()),
            scene.AddObserver(scene.NodeAboutToBeRemovedEvent, removed)]
    return lambda: [scene.RemoveObserver(tag) for tag in tags]


def volume_dimensions(volume_node: "slicer.vtkMRMLVolumeNode") -> tuple[int, int, int]:
    """``(I, J, K)`` voxel counts of the volume."""
    image = volume_node.GetImageData()
    if image is None:
        raise InvalidImageError(f"volume '{volume_node.GetName()}' has no image data")
    return tuple(int(d) for d in image.GetDimensions())  # type: ignore[return-value]


def locate_click(volume_node: "slicer.vtkMRMLVolumeNode", ras: "np.ndarray | list[float]", orientation: Orientation) -> SliceLocation:
    """The slice and pixel of a world-RAS click; raises :class:`InvalidClickError` outside the volume."""
    dims = volume_dimensions(volume_node)
    continuous = world_to_ijk(volume_node, ras)
    if not np.all(np.isfinite(continuous)):
        raise InvalidClickError(f"click position {tuple(ras)} is not a finite point")
    ijk = tuple(int(v) for v in np.floor(continuous + 0.5))
    if any(c < 0 or c >= n for c, n in zip(ijk, dims)):
        raise InvalidClickError(
            f"click at RAS {tuple(round(float(v), 2) for v in ras[:3])} is outside volume "
            f"'{volume_node.GetName()}' (voxel {ijk}, size {dims})"
        )
    axis = slice_axis(volume_node, orientation)
    if not isinstance(orientation, str):
        angle = off_plane_degrees(volume_node, orientation)
        if angle > MAX_OFF_PLANE_DEGREES:
            raise InvalidClickError(
                f"this view is {angle:.0f} degrees off the voxel planes of '{volume_node.GetName()}' "
                f"(at most {MAX_OFF_PLANE_DEGREES:.0f} allowed); align the view with the volume "
                "(slice view menu: 'Rotate to volume plane') and click again"
            )
    rows_axis, cols_axis = _in_plane_axes(axis)
    return SliceLocation(
        axis=axis,
        index=ijk[axis],
        ijk=ijk,  # type: ignore[arg-type]
        position=(ijk[rows_axis], ijk[cols_axis]),
        shape=(dims[rows_axis], dims[cols_axis]),
    )


def volume_channels(volume_node: "slicer.vtkMRMLVolumeNode") -> int:
    """Image channels the volume offers a model: 1 for a scalar volume, 3 for an RGB(A) vector volume.

    Raises:
        InvalidImageError: a labelmap, a tensor/DWI volume or an image with 2 or more than 4 components.
    """
    name = volume_node.GetName()
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InvalidImageError(f"'{name}' is a labelmap; choose the image volume to segment")
    # (vtkMRMLVectorVolumeNode derives from vtkMRMLTensorVolumeNode: test the diffusion classes.)
    if volume_node.IsA("vtkMRMLDiffusionTensorVolumeNode") or volume_node.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        raise InvalidImageError(f"'{name}' is a diffusion/tensor volume; choose a scalar or RGB volume")
    components = volume_node.GetImageData().GetNumberOfScalarComponents() if volume_node.GetImageData() else 0
    if components == 1:
        return 1
    if components in (3, 4):
        return 3  # RGB, or RGBA whose alpha carries no image content
    raise InvalidImageError(f"'{name}' has {components} components per voxel; a scalar or RGB volume is needed")


def check_volume_for_model(volume_node: "slicer.vtkMRMLVolumeNode", model_channels: int, model_name: str = "the model") -> None:
    """Raise :class:`InvalidImageError` with a plain explanation when there is no volume, when its
    geometry cannot map clicks (zero, negative or non-finite spacing; a direction matrix, with its
    parent transforms, that is not invertible) or when its kind does not fit the model."""
    if volume_node is None:
        raise InvalidImageError("no volume is selected: choose the volume to segment")
    spacing = np.asarray(volume_node.GetSpacing(), dtype=float)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise InvalidImageError(f"volume '{volume_node.GetName()}' has voxel spacing {tuple(spacing)}: every spacing "
                                "must be a positive number of mm (fix it in Volumes > Volume Information)")
    condition = np.linalg.cond(ijk_to_world(volume_node))
    if not np.isfinite(condition) or condition > 1e12:
        raise InvalidImageError(f"volume '{volume_node.GetName()}' has a degenerate geometry (its IJK-to-RAS matrix with "
                                "its parent transforms is not invertible): clicks cannot be mapped to voxels")
    channels = volume_channels(volume_node)
    if channels == model_channels:
        return
    kinds = {1: "a scalar (grey-level) volume, e.g. an MRI or CT", 3: "an RGB colour image, e.g. a fundus photo loaded as a vector volume"}
    raise InvalidImageError(
        f"{model_name} expects {kinds.get(model_channels, f'{model_channels} channels')}, "
        f"but '{volume_node.GetName()}' is {kinds.get(channels, f'{channels} channels')}. "
        "Choose a matching volume or another model."
    )


def volume_array(volume_node: "slicer.vtkMRMLVolumeNode") -> np.ndarray:
    """The voxel array ``[k, j, i]`` or ``[k, j, i, c]`` (a view on the image data: do not modify)."""
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    components = image.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((components,) if components > 1 else ())
    return array.reshape(shape)


def _channels_first(planes: np.ndarray, channel_axis: int) -> np.ndarray:
    """Voxel planes with their components last (or none) -> float32 with ``C`` (1, or R, G, B) at ``channel_axis``."""
    # np.array copies always: the result must not share the volume's VTK memory (a worker reads it).
    if planes.ndim == channel_axis + 2:
        return np.array(np.expand_dims(planes, channel_axis), dtype=np.float32, order="C")
    return np.array(np.moveaxis(planes[..., :3], -1, channel_axis), dtype=np.float32, order="C")


def extract_slice(volume_node: "slicer.vtkMRMLVolumeNode", location: SliceLocation) -> np.ndarray:
    """The slice through ``location`` as a channels-first float32 array ``(C, H, W)``.

    Scalar volumes give ``C = 1``; RGB(A) vector volumes give ``C = 3`` (R, G, B). Intensities
    are raw (the engine normalises).
    """
    return _channels_first(np.take(volume_array(volume_node), location.index, axis=2 - location.axis), 0)


def volume_slices(volume_node: "slicer.vtkMRMLVolumeNode", axis: int) -> np.ndarray:
    """Every slice normal to IJK ``axis``, ``(S, C, H, W)`` float32 (a copy: safe to hand to a worker);
    slice ``s`` is :func:`extract_slice` at index ``s``."""
    return _channels_first(np.moveaxis(volume_array(volume_node), 2 - axis, 0), 1)


def in_plane_spacing(volume_node: "slicer.vtkMRMLVolumeNode", axis: int) -> tuple[float, float]:
    """``(row mm, col mm)`` of the pixels of a slice normal to IJK ``axis``."""
    spacing = volume_node.GetSpacing()
    rows_axis, cols_axis = _in_plane_axes(axis)
    return float(spacing[rows_axis]), float(spacing[cols_axis])


def slice_location(volume_node: "slicer.vtkMRMLVolumeNode", axis: int, index: int) -> SliceLocation:
    """The whole slice ``index`` normal to IJK ``axis`` (its ``ijk`` and ``position`` are its first voxel)."""
    dims = volume_dimensions(volume_node)
    rows_axis, cols_axis = _in_plane_axes(axis)
    ijk = tuple(int(index) if a == axis else 0 for a in range(3))
    return SliceLocation(axis, int(index), ijk, (0, 0), (dims[rows_axis], dims[cols_axis]))  # type: ignore[arg-type]


def _slice_labelmap_geometry(
    segmentation_node: "slicer.vtkMRMLSegmentationNode", volume_node: "slicer.vtkMRMLVolumeNode"
) -> vtk.vtkMatrix4x4:
    """IJK-to-RAS of the volume expressed in the segmentation node's own (untransformed) frame."""
    # vtkSegmentation knows nothing about node transforms: a labelmap handed to it must be in the
    # segmentation node's local frame, i.e. world -> segmentation local applied to volume IJK -> world.
    segmentation_from_ijk = np.linalg.inv(_parent_to_world(segmentation_node)) @ ijk_to_world(volume_node)
    return _numpy_to_matrix(segmentation_from_ijk)


def _oriented_slice_image(
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    volume_node: "slicer.vtkMRMLVolumeNode",
    location: SliceLocation,
    values: "np.ndarray | None",
) -> "slicer.vtkOrientedImageData":
    """An oriented image covering only the slice's voxels, holding ``values`` (H, W) or zeros."""
    extent = location.extent
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    image.SetImageToWorldMatrix(_slice_labelmap_geometry(segmentation_node, volume_node))
    if values is None:
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.GetPointData().GetScalars().Fill(0)
        return image
    # Put the (H, W) plane back into [k, j, i] order with a length-1 axis along the slice normal.
    volume_shaped = np.expand_dims(np.asarray(values, dtype=np.uint8), axis=2 - location.axis)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(volume_shaped).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def _ensure_segmentation_converters() -> None:
    """Register the standard labelmap <-> surface rules when nobody has (pure slicer-core, no app).

    Slicer's Segmentations module registers them at application start-up; without them a
    segmentation cannot even create an empty binary labelmap. Idempotent: only acts on an
    empty factory.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def prepare_segmentation(segmentation_node: "slicer.vtkMRMLSegmentationNode", volume_node: "slicer.vtkMRMLVolumeNode") -> None:
    """Make the segmentation hold labelmaps on the volume's voxel grid and be displayable.

    An empty segmentation is put under the volume's parent transform and given the volume's
    geometry, so that slices are written voxel for voxel, without resampling (the reference
    geometry ignores transforms). A segmentation that already holds segments is left as it is:
    changing its frame or geometry would resample work the user already did; slices written
    into it are resampled onto its grid instead.
    """
    if segmentation_node is None:
        raise InvalidImageError("no segmentation is selected: choose one or create it with 'New segmentation'")
    _ensure_segmentation_converters()
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segmentation_node.GetDisplayNode() is None and segmentation_node.GetScene() is not None:
        segmentation_node.CreateDefaultDisplayNodes()


def ensure_segment(segmentation_node: "slicer.vtkMRMLSegmentationNode", name: str, color: "tuple[float, float, float] | None" = None) -> str:
    """ID of the segment called ``name``, added (empty) if the segmentation has none by that name."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if segment_id:
        return segment_id
    segment_id = segmentation.AddEmptySegment("", name)
    if color is not None:
        segmentation.GetSegment(segment_id).SetColor(*color)
    return segment_id


def read_slice_mask(
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    segment_id: str,
    volume_node: "slicer.vtkMRMLVolumeNode",
    location: SliceLocation,
) -> np.ndarray:
    """The segment on the clicked slice, resampled onto the volume's voxels: bool ``(H, W)``."""
    segment_labelmap = slicer.vtkOrientedImageData()
    # Local frame (no parent transform): the reference below is expressed in that frame too.
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, segment_labelmap, False
    )
    reference = _oriented_slice_image(segmentation_node, volume_node, location, None)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment_labelmap.GetPointData().GetScalars() is None or segment is None:
        return np.zeros(location.shape, dtype=bool)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        segment_labelmap, reference, resampled, False, False
    )
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars())
    # Segments may share one labelmap layer, each with its own label value.
    return (values == segment.GetLabelValue()).reshape(location.shape)


def write_slice_mask(
    segmentation_node: "slicer.vtkMRMLSegmentationNode",
    volume_node: "slicer.vtkMRMLVolumeNode",
    location: SliceLocation,
    mask: np.ndarray,
    class_segments: Mapping[int, str],
) -> None:
    """Write a class map ``(H, W)`` into segments, on the clicked slice only.

    Args:
        mask: integer class map of the slice (0 background).
        class_segments: ``{class index: segment ID}``; each segment becomes ``mask == class``
            on this slice and keeps every voxel outside it.
    """
    mask = np.asarray(mask)
    if mask.shape != location.shape:
        raise InvalidImageError(f"mask of shape {mask.shape} does not fit the slice of shape {location.shape}")
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    extent = location.extent
    # MODE_REPLACE is not usable here: on segments that share a labelmap layer it clears the
    # whole segment, and otherwise it can crop the labelmap to the modifier. Instead, as the
    # Segment Editor's effects do, only the pixels that change are touched: those to clear with
    # a minimum against a slice that is 0 there and 1 elsewhere, those to set with masking. Both
    # are confined to the slice's extent; a segment that would overwrite another one on its
    # layer is moved to a layer of its own. Pixels that keep their value are never rewritten.
    for label, segment_id in class_segments.items():
        wanted = mask == label
        held = read_slice_mask(segmentation_node, segment_id, volume_node, location)
        for mode, values in ((logic.MODE_MERGE_MIN, ~(held & ~wanted)), (logic.MODE_MERGE_MASK, wanted & ~held)):
            if (mode == logic.MODE_MERGE_MIN and values.all()) or (mode == logic.MODE_MERGE_MASK and not values.any()):
                continue
            modifier = _oriented_slice_image(segmentation_node, volume_node, location, values)
            if not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, mode, extent):
                raise InvalidImageError(f"could not write segment '{segment_id}' of '{segmentation_node.GetName()}'")


def read_slice_classes(segmentation_node: "slicer.vtkMRMLSegmentationNode", volume_node: "slicer.vtkMRMLVolumeNode",
                       location: SliceLocation, class_segments: Mapping[int, str]) -> np.ndarray:
    """The class map ``(H, W)`` uint8 the class segments hold on the slice now (a higher class wins an overlap)."""
    classes = np.zeros(location.shape, np.uint8)
    for label, segment_id in sorted(class_segments.items()):
        classes[read_slice_mask(segmentation_node, segment_id, volume_node, location)] = label
    return classes


@dataclass(frozen=True)
class SegmentedSlice:
    """One slice being segmented: where it is, its image and what its segments held before the
    first click, so that results can be written there and the slice put back as it was.

    Attributes:
        image: the slice's intensities, channels first ``(C, H, W)`` (:func:`extract_slice`).
        before: ``{class index: bool (H, W)}``, each class segment on the slice when it was read.
        spacing: ``(row mm, col mm)`` of the slice's pixels (the volume's spacing along its in-plane axes).
    """

    volume_node: "slicer.vtkMRMLVolumeNode"
    segmentation_node: "slicer.vtkMRMLSegmentationNode"
    class_segments: Mapping[int, str]
    location: SliceLocation
    image: np.ndarray
    before: Mapping[int, np.ndarray]
    spacing: tuple[float, float] = (1.0, 1.0)

    @classmethod
    def read(cls, volume_node, segmentation_node, class_segments: Mapping[int, str], location: SliceLocation) -> "SegmentedSlice":
        """Read the slice at ``location`` and what ``class_segments`` hold there."""
        before = {index: read_slice_mask(segmentation_node, segment_id, volume_node, location)
                  for index, segment_id in class_segments.items()}
        return cls(volume_node, segmentation_node, dict(class_segments), location, extract_slice(volume_node, location),
                   before, in_plane_spacing(volume_node, location.axis))

    def write(self, mask: np.ndarray, class_segments: "Mapping[int, str] | None" = None) -> None:
        """:func:`write_slice_mask` on this slice (into ``class_segments``, default the class segments)."""
        write_slice_mask(self.segmentation_node, self.volume_node, self.location, mask, class_segments or self.class_segments)

    def read_classes(self) -> np.ndarray:
        """What the class segments hold on this slice now, as a class map ``(H, W)`` (paint and erase included)."""
        return read_slice_classes(self.segmentation_node, self.volume_node, self.location, self.class_segments)

    def restore(self) -> None:
        """Put back what the class segments held on this slice when it was read."""
        for index, segment_id in self.class_segments.items():
            self.write(self.before[index].astype(np.uint8), {1: segment_id})


def class_segments(segmentation_node: "slicer.vtkMRMLSegmentationNode", labels: Mapping[str, int],
                   segment_id: "str | None" = None) -> dict[int, str]:
    """``{class index: segment ID}`` for a model's foreground ``labels`` (``{name: index}``):
    ``segment_id`` takes class 1 when given; the others are found by class name or created."""
    result = {}
    for name, index in sorted(labels.items(), key=lambda item: item[1]):
        if index:
            result[index] = segment_id if index == 1 and segment_id else ensure_segment(segmentation_node, name)
    return result


def remove_segments_named(segmentation_node: "slicer.vtkMRMLSegmentationNode", prefix: str) -> None:
    """Remove every segment whose name starts with ``prefix`` (e.g. temporary proposal segments)."""
    segmentation = segmentation_node.GetSegmentation()
    for segment_id in list(segmentation.GetSegmentIDs()):
        if segmentation.GetSegment(segment_id).GetName().startswith(prefix):
            segmentation.RemoveSegment(segment_id)


def show_only_segment(segmentation_node: "slicer.vtkMRMLSegmentationNode", segment_ids: "list[str]", shown: int) -> None:
    """Show segment ``segment_ids[shown]`` and hide the other ones of ``segment_ids`` (e.g. proposals)."""
    display = segmentation_node.GetDisplayNode()
    if display is not None:
        for index, segment_id in enumerate(segment_ids):
            display.SetSegmentVisibility(segment_id, index == shown)


def click_point_list(scene: "slicer.vtkMRMLScene", positive: bool) -> "slicer.vtkMRMLMarkupsFiducialNode":
    """A new markups point list for foreground (``positive``, green) or background (red) clicks, unlabelled."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "OAIMS foreground" if positive else "OAIMS background")
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetSelectedColor((0.2, 0.9, 0.2) if positive else (0.9, 0.2, 0.2))
    node.GetDisplayNode().SetPointLabelsVisibility(False)
    return node


def placed_point(scene: "slicer.vtkMRMLScene", point_list: "slicer.vtkMRMLMarkupsFiducialNode", index: int):
    """World RAS of control point ``index`` and the slice node of the view it was placed in (the
    crosshair's, else the view whose plane passes closest to it; None if there is none)."""
    ras = [0.0, 0.0, 0.0]
    point_list.GetNthControlPointPositionWorld(index, ras)
    crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
    slice_node = crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0]) if crosshair else None
    return ras, slice_node or closest_slice_node(scene, ras)


def closest_slice_node(scene: "slicer.vtkMRMLScene", ras: "np.ndarray | list[float]") -> "slicer.vtkMRMLSliceNode | None":
    """The slice node whose plane passes closest to a world-RAS point (the view a point was placed in)."""
    point = np.append(np.asarray(ras, dtype=float)[:3], 1.0)
    best, best_distance = None, np.inf
    nodes = scene.GetNodesByClass("vtkMRMLSliceNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        slice_to_ras = _matrix_to_numpy(node.GetSliceToRAS())
        normal = slice_to_ras[:3, 2] / np.linalg.norm(slice_to_ras[:3, 2])
        distance = abs(normal @ (point[:3] - slice_to_ras[:3, 3]))
        if distance < best_distance:
            best, best_distance = node, distance
    return best


def segment_editor_node(scene: "slicer.vtkMRMLScene") -> "slicer.vtkMRMLSegmentEditorNode":
    """The scene's singleton Segment Editor node (tag "SegmentEditor"), created if missing, as the
    Segment Editor module does: sharing it keeps volume, segmentation and segment in step with it."""
    node = scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    if node is None:
        if not scene.IsNodeClassRegistered("vtkMRMLSegmentEditorNode"):  # pure slicer-core: no Segmentations module
            scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
        node = scene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
        node.UnRegister(None)
        node.SetSingletonTag("SegmentEditor")
        node = scene.AddNode(node)
    return node


def shown_volume(scene: "slicer.vtkMRMLScene") -> "slicer.vtkMRMLVolumeNode | None":
    """The volume the slice views show: the first background volume of a view, else the first foreground
    one, as the Segment Editor module picks its default source volume (Slicer v5.8.1
    ``Modules/Scripted/SegmentEditor/SegmentEditor.py:96-112``); None when no view shows one."""
    nodes = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    composites = [nodes.GetItemAsObject(index) for index in range(nodes.GetNumberOfItems())]
    shown = [c.GetBackgroundVolumeID() for c in composites] + [c.GetForegroundVolumeID() for c in composites]
    return next((scene.GetNodeByID(node_id) for node_id in shown if node_id), None)


def new_segmentation(scene: "slicer.vtkMRMLScene", volume_node: "slicer.vtkMRMLVolumeNode", segment_name: str):
    """A new segmentation on the volume's grid with one empty segment; returns ``(node, segment ID)``."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} segmentation")
    prepare_segmentation(node, volume_node)
    return node, ensure_segment(node, segment_name)


def segment_stamp(segmentation_node: "slicer.vtkMRMLSegmentationNode | None", segment_id: "str | None") -> int:
    """A number that changes whenever the segment's labelmap changes (its MTime; 0 without a segment)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segmentation_node and segment_id else None
    labelmap = segment.GetRepresentation("Binary labelmap") if segment is not None else None
    return int(labelmap.GetMTime()) if labelmap is not None else 0
