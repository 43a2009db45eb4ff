"""``pip install .`` must install one ``dicomlake`` package and the ``dicomlake`` command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_holds_only_the_dicomlake_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("dicomlake-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # <name>.data/ holds shared data (the JupyterLab extension), installed outside site-packages
    top = {n.split("/")[0] for n in names
           if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"dicomlake"}
    for sub in ("catalog", "udfs", "sql", "streaming", "extension", "bench"):
        assert f"dicomlake/{sub}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "dicomlake = dicomlake.cli:main" in text
