"""Packaging: the wheel that ``pip install .`` builds carries the engine, the shipped models and
the ``oaims`` command, and the installed engine finds its models inside the package."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline (no index, no build isolation) from a copy of the sources, so the
    build's own folders never land in the working tree."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "OAIMSSegment", source / "OAIMSSegment", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "Resources" / "Models", source / "Resources" / "Models")
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(source)],
        check=True, capture_output=True, text=True,
    )
    (built,) = dist.glob("oaimssegment-*.whl")
    return built


def test_wheel_holds_the_engine_the_shipped_models_and_the_oaims_command(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for module in (ROOT / "OAIMSSegment").rglob("*.py"):
            assert module.relative_to(ROOT).as_posix() in names
        shipped = sorted((ROOT / "Resources" / "Models").iterdir())
        assert shipped
        for path in shipped:
            packed = archive.read(f"OAIMSSegment/Models/{path.name}")
            assert hashlib.sha256(packed).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest(), path.name
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "oaims = OAIMSSegment.cli:oaims" in archive.read(entry_points).decode()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = archive.read(metadata).decode()
        assert "Requires-Dist: monai" in requires and "Requires-Python: >=3.10" in requires


def test_installed_engine_loads_its_models_from_the_package_and_runs_oaims(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")  # what pip install puts in site-packages
    script = (
        "import sys; from OAIMSSegment.model import MODELS_DIR, load_model; print(MODELS_DIR); "
        "load_model('demo-synthetic-blobs'); from OAIMSSegment.cli import oaims; sys.argv = ['oaims', '--help']; oaims()"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    lines = done.stdout.splitlines()
    assert Path(lines[0]) == tmp_path / "site" / "OAIMSSegment" / "Models", done.stderr
    assert "usage: oaims" in done.stdout and all(command in done.stdout for command in ("demo", "evaluate", "pretrain"))
