"""The ``bench`` command (issue 21's figures): one run writes every timing with its ratio to the
forward pass, and bad arguments are refused before anything is timed."""

from __future__ import annotations

import json

import pytest

from OAIMSSegment.cli import main


def test_bench_writes_every_timing_and_its_ratio_to_the_forward_pass(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", "demo-synthetic-blobs", "--repeats", "1", "--size", "32", "--threads", "1",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    figures = result["models"]["demo-synthetic-blobs"]
    assert figures["working_shape"] == [32, 32] and result["threads"] == 1
    for key in figures["ratio_to_forward"]:
        assert figures[f"{key}_ms"]["p50"] > 0 and figures["ratio_to_forward"][key] > 0
    assert {"mi", "pi", "first_feedback", "propagate40"} <= set(figures["ratio_to_forward"])


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--threads", "-1"], ["--size", "x"], ["--size", "8"], ["--json", "."]])
def test_bench_refuses_bad_arguments_before_timing_anything(tmp_path, bad):
    arguments = {"--json": str(tmp_path / "bench.json"), **dict(zip(bad[::2], bad[1::2]))}
    with pytest.raises(SystemExit) as refused:
        main(["bench", "--models", "demo-synthetic-blobs", *[part for item in arguments.items() for part in item]])
    assert refused.value.code == 2 and not (tmp_path / "bench.json").exists()
