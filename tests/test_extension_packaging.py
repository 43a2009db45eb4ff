"""``pip install .`` must ship the built JupyterLab front end and switch on the server
extension, so ``jupyter lab`` shows the sidebar with no extra step."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LABEXT = "dicomlake-0.1.0.data/data/share/jupyter/labextensions/@dicomlake/jupyterlab/"


@pytest.mark.slow
def test_wheel_carries_the_labextension_and_server_config(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, timeout=900)
    (wheel,) = tmp_path.glob("dicomlake-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    package = json.loads(archive.read(LABEXT + "package.json"))
    assert package["name"] == "@dicomlake/jupyterlab"
    entry = package["jupyterlab"]["_build"]["load"]
    assert LABEXT + entry in names
    assert LABEXT + "schemas/@dicomlake/jupyterlab/browser.json" in names
    config = json.loads(archive.read(
        "dicomlake-0.1.0.data/data/etc/jupyter/jupyter_server_config.d/dicomlake.json"))
    assert config["ServerApp"]["jpserver_extensions"] == {"dicomlake.extension": True}
    assert "dicomlake/extension/handlers.py" in names
