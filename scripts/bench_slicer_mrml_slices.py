"""MRML cost of a propagation in the Slicer Logic (main thread, besides the forward passes): writing and
reading back N whole slices of one segment, and copying the volume's slices for the worker, on real
slicer-core MRML. Writes JSON.

Usage: python scripts/bench_slicer_mrml_slices.py [--shape 155 240 240] [--slices 40] --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "Testing" / "Python")]

import slicer_test_doubles  # noqa: E402  (slicer.mrmlScene etc. as in the tests)

from OAIMSSegment import mrml  # noqa: E402
from OAIMSSegment.files import atomic_write_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(155, 240, 240), help="volume [k, j, i]")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    slicer_test_doubles.install(tempfile.mkdtemp())
    import slicer
    from test_slicer_module import add_volume

    scene = slicer.mrmlScene
    volume = add_volume(scene, np.random.default_rng(0).normal(size=args.shape).astype(np.float32), np.eye(4))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mrml.prepare_segmentation(segmentation, volume)
    segments = {1: mrml.ensure_segment(segmentation, "lesion")}
    mask = np.zeros(args.shape[1:], np.uint8)
    mask[args.shape[1] // 3: args.shape[1] // 2, args.shape[2] // 3: args.shape[2] // 2] = 1
    first = (args.shape[0] - args.slices) // 2
    locations = [mrml.slice_location(volume, 2, k) for k in range(first, first + args.slices)]
    started = time.perf_counter()
    for location in locations:
        mrml.write_slice_mask(segmentation, volume, location, mask, segments)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    for location in locations:
        mrml.read_slice_classes(segmentation, volume, location, segments)
    read_s = time.perf_counter() - started
    started = time.perf_counter()
    mrml.volume_slices(volume, 2)
    copy_s = time.perf_counter() - started
    result = {"shape": list(args.shape), "slices": args.slices, "write_seconds": round(write_s, 3),
              "read_seconds": round(read_s, 3), "volume_slices_seconds": round(copy_s, 4)}
    atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
