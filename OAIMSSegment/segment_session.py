"""One segment as a clinician works on it: several 2D slices, one Accept (no Qt, no Slicer).

A segment of a volume is drawn slice by slice. Moving to another slice keeps the slice left as it
is (its result stays, its MI updates stay in the weights) and goes on; nothing is trained for the
site and nothing is saved until the segment is accepted. Then PI runs once per slice that has
clicks, on what that slice finally holds (the clinician's paint and erase included), and the site
gets ONE new version (:meth:`SiteSession.save_update`).

* :class:`SegmentWork` (engine side, worker thread): the slices' images and clicks, the weights
  before the segment's first click, open / click / undo / accept / discard.
* :class:`SliceEdits` (display side, main thread): what was written on one slice and which
  pixels the clinician edited, so a new click keeps those edits (:meth:`SliceEdits.merge`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Dict, Hashable, List, Mapping, Optional, Set, Tuple

import numpy as np

from OAIMSSegment.errors import SessionStateError

if TYPE_CHECKING:  # torch-free at run time: the Slicer module imports this before torch is installed
    from OAIMSSegment.clicks import Click

__all__ = ["SegmentWork", "SegmentAccept", "SliceAccept", "SliceEdits", "InPlaneGrid", "EDIT_OVERRIDE_RADIUS_PX"]

#: A click "asks" for its prediction at the pixels within this many slice pixels of it (a disk):
#: there a new click's prediction replaces the clinician's earlier paint or erase; elsewhere edits stay.
EDIT_OVERRIDE_RADIUS_PX = 3.0

#: ``edits`` value of a pixel the clinician has not edited.
NOT_EDITED = -1


@dataclass(frozen=True)
class InPlaneGrid:
    """A slice of ``shape`` ``(H, W)`` pixels with ``spacing`` ``(row mm, col mm)``, resampled for the
    model to isotropic pixels of the finer spacing (a coronal slice of a 1x1x5 mm volume is 5:1
    otherwise), and the model's masks sampled back at the slice's pixel centres."""

    shape: Tuple[int, int]
    spacing: Tuple[float, float] = (1.0, 1.0)

    @property
    def model_shape(self) -> Tuple[int, int]:
        finest = min(self.spacing)
        return tuple(max(1, int(round(n * s / finest))) for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]

    def _centres(self, axis: int) -> np.ndarray:
        """For each slice pixel along ``axis``, the model pixel holding its centre."""
        n, m = self.shape[axis], self.model_shape[axis]
        return np.minimum(((np.arange(n) + 0.5) * m / n).astype(int), m - 1)

    def image_to_model(self, image: np.ndarray) -> np.ndarray:
        """``(C, H, W)`` -> ``(C, H', W')`` by linear interpolation (unchanged when already isotropic)."""
        if self.model_shape == tuple(self.shape):
            return image
        from scipy import ndimage

        zoom = (1.0, self.model_shape[0] / self.shape[0], self.model_shape[1] / self.shape[1])
        return ndimage.zoom(image, zoom, order=1, mode="nearest", grid_mode=True).astype(image.dtype, copy=False)

    def click_to_model(self, position: Tuple[int, int]) -> Tuple[int, int]:
        return tuple(int(c[p]) for c, p in zip((self._centres(0), self._centres(1)), position))  # type: ignore[return-value]

    def mask_from_model(self, mask: Optional[np.ndarray]) -> Optional[np.ndarray]:
        """A model-grid class map sampled at the slice's pixel centres: ``(H, W)``."""
        return None if mask is None else mask[np.ix_(self._centres(0), self._centres(1))]

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """A slice class map ``(H, W)`` on the model grid (nearest pixel)."""
        rows = np.minimum((np.arange(self.model_shape[0]) * self.shape[0] // self.model_shape[0]), self.shape[0] - 1)
        cols = np.minimum((np.arange(self.model_shape[1]) * self.shape[1] // self.model_shape[1]), self.shape[1] - 1)
        return np.asarray(mask)[np.ix_(rows, cols)]


@dataclass
class _WorkedSlice:
    image: np.ndarray  # on the model grid
    grid: InPlaneGrid
    clicks: List[Click] = field(default_factory=list)  # on the model grid
    seeded: int = 0  # the first clicks are seeds a propagation placed, not the clinician's


def _worked_slice(image: np.ndarray, spacing: Tuple[float, float], seeds, seeded: bool) -> _WorkedSlice:
    """A slice (``(C, H, W)``, raw; ``spacing`` (row, col) mm) on its model grid, with ``seeds`` (slice
    pixels) as its first clicks: propagation's (``seeded``), or standing for the clinician's."""
    grid = InPlaneGrid(tuple(np.shape(image)[-2:]), tuple(float(s) for s in spacing))
    placed = [replace(seed, position=grid.click_to_model(seed.position)) for seed in seeds]
    return _WorkedSlice(grid.image_to_model(np.asarray(image)), grid, placed, len(placed) if seeded else 0)


@dataclass(frozen=True)
class SliceAccept:
    """PI on one slice of an accepted segment: ``accepted_pixels`` is the foreground PI learned from."""

    key: Hashable
    accepted_pixels: int
    applied: bool
    reason: str


@dataclass(frozen=True)
class SegmentAccept:
    """An accepted segment: the site's answer (:class:`~OAIMSSegment.site_session.SiteAccept`), one row
    per slice, the clicks PI saw and the site version now in use (the new one when saved)."""

    site: object
    slices: Tuple[SliceAccept, ...]
    clicks: int
    version: int

    def report(self, latency_ms: float) -> dict:
        """The Slicer Logic's accept report: ``version`` (the site's, also when nothing was saved),
        ``saved``, ``message``, ``latencyMs``, ``clicks`` and ``slices`` (``sliceIndex``, ``sliceAxis``,
        ``acceptedPixels``, ``applied``, ``reason``), slice keys being ``(axis, index)``."""
        return {"version": self.version, "saved": bool(self.site.saved), "message": self.site.message,
                "latencyMs": latency_ms, "clicks": self.clicks,
                "slices": [{"sliceIndex": int(row.key[1]), "sliceAxis": "IJK"[row.key[0]], "acceptedPixels": row.accepted_pixels,
                            "applied": row.applied, "reason": row.reason} for row in self.slices]}


class SegmentWork:
    """The slices of one segment that have been opened, on a :class:`SiteSession` (worker thread only).

    Args:
        site: the :class:`~OAIMSSegment.site_session.SiteSession` whose session segments and adapts.
    """

    def __init__(self, site) -> None:
        self.site = site
        self._slices: Dict[Hashable, _WorkedSlice] = {}
        self._open: Optional[Hashable] = None
        self._start: Optional[dict] = None  # session state before the segment's first slice

    @property
    def slices(self) -> List[Hashable]:
        """Keys of the slices that hold the clinician's clicks, in the order they were first opened."""
        return [key for key, worked in self._slices.items() if len(worked.clicks) > worked.seeded]

    @property
    def openClicks(self) -> int:
        """The clinician's clicks on the open slice (its propagation seeds not counted; 0 when none is open)."""
        worked = self._slices.get(self._open) if self._open is not None and self.site.session.active else None
        return len(worked.clicks) - worked.seeded if worked is not None else 0

    @property
    def openImage(self) -> Optional[Tuple[np.ndarray, InPlaneGrid]]:
        """The open slice's image as the model sees it ``(C, H', W')`` and its grid (None when none is open)."""
        worked = self._slices.get(self._open) if self._open is not None else None
        return (worked.image, worked.grid) if worked is not None else None

    def open(self, key: Hashable, image: np.ndarray, settings: Optional[tuple] = None,
             spacing: Tuple[float, float] = (1.0, 1.0), seeds: Tuple["Click", ...] = ()) -> Optional[np.ndarray]:
        """Make slice ``key`` (image ``(C, H, W)``, raw; ``spacing`` its (row, col) mm) the open image and
        return its mask (None without clicks). The slice open before stays as it is; a slice opened
        before is resumed with its clicks, without adapting again. ``settings`` ``(method,
        AdaptConfig)`` take effect first when this is the segment's first slice. The model sees the
        slice at isotropic in-plane spacing (:class:`InPlaneGrid`); masks and clicks here are the slice's.
        ``seeds`` (slice pixels): the clicks a propagation segmented a new slice with; a correction
        click joins them, as in :meth:`VolumeSession.click`."""
        session = self.site.session
        if self._start is None:
            if settings:
                session.discard()
                session.reconfigure(*settings)
            self._start = session.state_dict()
        self._leave()
        if key not in self._slices:
            self._slices[key] = _worked_slice(image, spacing, seeds, seeded=True)
        worked = self._slices[key]
        mask = session.resume(worked.image, worked.clicks)
        self._open = key
        return worked.grid.mask_from_model(mask)

    def click(self, position: Tuple[int, int], label: int):
        """A click at ``position`` (row, col) of the open slice (``session.add_click``: MI step, new
        prediction); returns the ClickResult, its mask on the slice's pixels."""
        worked = self._require_open()
        result = self.site.session.add_click(worked.grid.click_to_model(position), label)
        worked.clicks.append(result.click)
        return replace(result, mask=worked.grid.mask_from_model(result.mask))

    def undo(self) -> Optional[np.ndarray]:
        """Remove the open slice's last click (and its MI update when it was made on this visit); returns the mask."""
        worked = self._require_open()
        mask = self.site.session.undo()
        worked.clicks.pop()
        return worked.grid.mask_from_model(mask)

    def propagate(self, slices: np.ndarray, spacing: Tuple[float, float], origin: int, origin_mask: np.ndarray,
                  blocked: Set[int], rule=None, former: Optional[int] = None) -> Tuple[list, list]:
        """Propagate ``origin_mask`` ``(H, W)`` (what slice ``origin`` holds) up and down ``slices``
        ``(S, C, H, W)`` (raw, one axis of the volume; ``spacing`` their (row, col) mm) until the
        structure ends or a ``blocked`` slice (:func:`~OAIMSSegment.volume.propagate_line`, one forward
        pass per slice at isotropic in-plane spacing, no adaptation); ``former``: the origin whose
        propagation had reached ``origin`` (then only away from it, :func:`~OAIMSSegment.volume.propagation_steps`).
        Returns ``([(index, mask, seeds), ...], [(index where a direction stopped, its step), ...])``;
        masks and seeds are in slice pixels."""
        from OAIMSSegment.clicks import Click
        from OAIMSSegment.volume import Propagation, propagate_line, propagation_steps, seeded_prediction, slices_ahead

        grid = InPlaneGrid(tuple(np.shape(slices)[-2:]), tuple(float(s) for s in spacing))
        model = self.site.session.model

        def predict(index: int, seeds: list):
            clicks = [Click(grid.click_to_model(seed.position), seed.label) for seed in seeds]
            predicted = seeded_prediction(model, grid.image_to_model(np.asarray(slices[index])), clicks)
            return None if predicted is None else (grid.mask_from_model(predicted[0]), predicted[1])

        propagated, ends = [], []
        for step in propagation_steps(origin, former):
            line = propagate_line(predict, np.asarray(origin_mask), slices_ahead(origin, step, len(slices), blocked),
                                  rule or Propagation())
            propagated += line
            ends.append(((line[-1][0] if line else origin) + step, step))
        return propagated, ends

    def accept(self, finals: Mapping[Hashable, np.ndarray], settings: Optional[tuple] = None,
               edited: Optional[Mapping[Hashable, tuple]] = None) -> SegmentAccept:
        """PI once per slice with clicks, each on ``finals[key]`` (the class map ``(H, W)`` the slice
        holds now), then one site version when the weights changed (PI applied or MI steps).
        ``edited``: ``{key: (image, spacing, seeds)}`` of propagated slices the clinician edited without
        clicking them: learnt from too, after the others, their seeds standing for their clicks.
        ``settings`` take effect afterwards. Raises SessionStateError when no slice has clicks."""
        for key, (image, spacing, seeds) in (edited or {}).items():
            self._slices[key] = _worked_slice(image, spacing, seeds, seeded=False)
        keys = self.slices
        if not keys:
            raise SessionStateError("nothing to accept: click in a slice first")
        session = self.site.session
        self._leave()
        adapted = self._weights_changed()
        outcomes, rows = [], []
        try:  # the segment is over even if PI or the save fails: its state must not leak into the next
            for key in keys:
                worked, final = self._slices[key], np.asarray(finals[key])
                session.resume(worked.image, worked.clicks)
                outcome = session.accept(mask=worked.grid.mask_to_model(final))
                outcomes.append(outcome)
                rows.append(SliceAccept(key, int((final > 0).sum()), outcome.applied, outcome.reason))
            accepted = self.site.save_update(outcomes, adapted or any(o.applied for o in outcomes))
        finally:
            self._finish(settings)
        version = accepted.version if accepted.saved else self.site.version
        return SegmentAccept(accepted, tuple(rows), sum(o.clicks for o in outcomes), int(version or 0))

    def discard(self, settings: Optional[tuple] = None) -> None:
        """Drop the segment's work: the weights go back to how they were before its first slice."""
        self.site.session.discard()
        if self._start is not None:
            self.site.session.load_state_dict(self._start)
        self._finish(settings)

    # -- internals ----------------------------------------------------------------------------

    def _require_open(self) -> _WorkedSlice:
        if self._open is None or not self.site.session.active:
            raise SessionStateError("no image is open: click in a slice first")
        return self._slices[self._open]

    def _leave(self) -> None:
        """Close the open image keeping the updates it caused (``discard`` alone would revert them)."""
        session = self.site.session
        if session.active:
            state = session.state_dict()
            session.discard()
            session.load_state_dict(state)
        self._open = None

    def _weights_changed(self) -> bool:
        if self._start is None:
            return False
        now = self.site.session.state_dict()["model"]
        return any(not np.array_equal(now[name].cpu().numpy(), value.cpu().numpy())
                   for name, value in self._start["model"].items())

    def _finish(self, settings: Optional[tuple]) -> None:
        self._slices.clear()
        self._open, self._start = None, None
        if settings:
            self.site.session.discard()
            self.site.session.reconfigure(*settings)


class SliceEdits:
    """What was written on one slice and what the clinician changed there (main thread).

    Args:
        shape: ``(H, W)`` of the slice.

    Attributes:
        written: the class map last written by a click (None before the first).
        edits: ``(H, W)`` int16, the class the clinician set at a pixel (paint or erase, read as a
            difference between the slice and ``written``), :data:`NOT_EDITED` elsewhere.
    """

    def __init__(self, shape: Tuple[int, int]) -> None:
        self.written: Optional[np.ndarray] = None
        self.edits = np.full(shape, NOT_EDITED, np.int16)
        self._history: List[tuple] = []  # (slice content before a click's write, written, edits) per click

    @property
    def clicks(self) -> int:
        """Clicks written on this slice (and not undone)."""
        return len(self._history)

    def merge(self, prediction: np.ndarray, current: np.ndarray, click: Tuple[int, int],
              radius: float = EDIT_OVERRIDE_RADIUS_PX) -> np.ndarray:
        """The class map to write after a click: the new ``prediction`` except where the clinician
        edited the slice (``current``, what it holds now, differs from what was written; content
        that was there before the first click counts as edited), which keeps the edit, unless the
        pixel is within ``radius`` pixels of the new ``click`` (row, col): there the click asks for
        its prediction and the edit is forgotten."""
        current = np.asarray(current)
        written = self.written if self.written is not None else np.zeros_like(current)
        self._history.append((current.copy(), self.written, self.edits.copy()))
        changed = current != written
        self.edits[changed] = current[changed]
        rows, cols = np.ogrid[: current.shape[0], : current.shape[1]]
        asked = (rows - click[0]) ** 2 + (cols - click[1]) ** 2 <= radius ** 2
        self.edits[asked] = NOT_EDITED
        merged = np.where(self.edits != NOT_EDITED, self.edits, prediction).astype(np.uint8)
        self.written = merged
        return merged

    def undo(self) -> np.ndarray:
        """Forget the last click's write; returns what the slice held just before it (to write back)."""
        if not self._history:
            raise SessionStateError("there is no click to undo")
        content, self.written, self.edits = self._history.pop()
        return content
