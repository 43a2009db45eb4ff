"""Installed as a user installs it: one wheel from ``python -m build``, into a fresh venv.

The wheel must carry everything (the ``dicomlake`` namespace only, the built JupyterLab front
end, the server-extension switch, the ONNX model) and work with no checkout, no npm and no
torch. A regular (non-editable) install must also work when the user stands in the checkout:
Spark's Python workers start in the current directory, and the checkout's ``dicomlake/``
folder (which lacks the mapped ``catalog``, ``udfs``... subpackages) must not shadow the
installed package there.

The venv uses Python 3.12 where the machine has it (pyenv holds it on ours), so the suite,
which runs on 3.11, also proves a second interpreter; otherwise it uses this one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = "dicomlake-0.1.0.data/data/"
LABEXT = DATA + "share/jupyter/labextensions/@dicomlake/jupyterlab/"

pytestmark = pytest.mark.slow


def _second_python() -> str:
    """Python 3.12 if installed (PATH or pyenv), else the interpreter running the tests."""
    found = shutil.which("python3.12")
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    for candidate in ([found] if found else []) + [str(p) for p in pyenv]:
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 12)":
            return candidate
    return sys.executable


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out),
                    str(ROOT)], check=True, timeout=900, capture_output=True)
    (built,) = out.glob("dicomlake-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh venv holding the wheel with the ``[jupyter]`` extra, and nothing from here."""
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([_second_python(), "-m", "venv", str(root)], check=True, timeout=300)
    subprocess.run([str(root / "bin" / "pip"), "install", "-q", f"{wheel}[jupyter]"],
                   check=True, timeout=1500, cwd=root)
    return root


def _env(venv: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", DICOMLAKE_HOME=str(home),
               DICOMLAKE_JVM_ARCHIVE="off")
    return env


def test_the_wheel_holds_the_package_the_front_end_and_the_model(wheel):
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    top = {n.split("/")[0] for n in names
           if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"dicomlake"}
    for sub in ("catalog", "udfs", "sql", "streaming", "extension", "bench"):
        assert f"dicomlake/{sub}/__init__.py" in names
    assert "dicomlake/udfs/models/efficientnet-lite0.onnx" in names
    assert "dicomlake/streaming/flink-requirements.txt" in names
    viewer = [n for n in names if n.startswith("dicomlake/dicomnet/viewer/")]
    assert "dicomlake/dicomnet/viewer/index.html" in viewer
    assert any(n.endswith(".wasm") for n in viewer)
    assert [n for n in viewer if re.fullmatch(r".*/viewer/app\.bundle\.[0-9a-f]+\.js", n)]
    assert not [n for n in viewer if n.endswith(".map") or "/viewer/ort/" in n]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dicomlake = dicomlake.cli:main" in archive.read(entry_points).decode()
    package = json.loads(archive.read(LABEXT + "package.json"))
    assert package["name"] == "@dicomlake/jupyterlab"
    assert LABEXT + package["jupyterlab"]["_build"]["load"] in names
    assert LABEXT + "schemas/@dicomlake/jupyterlab/browser.json" in names
    config = json.loads(archive.read(DATA + "etc/jupyter/jupyter_server_config.d/dicomlake.json"))
    assert config["ServerApp"]["jpserver_extensions"] == {"dicomlake.extension": True}
    metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Python: >=3.11" in metadata
    core = [line for line in metadata.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in core if any(
        heavy in line for heavy in ("torch", "tensorflow", "jupyterlab", "onnx", "faiss"))]


def test_a_fresh_venv_runs_the_demo_and_lists_the_extension(venv, tmp_path):
    env = _env(venv, tmp_path / "home")
    demo = subprocess.run(["dicomlake", "demo", "--no-lab", "--archives", "2", "--files", "10"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "SHOW TABLES IN dicom" in demo.stdout and "instances" in demo.stdout
    assert "torch" not in subprocess.run(
        [str(venv / "bin" / "pip"), "list"], capture_output=True, text=True, env=env).stdout
    listed = subprocess.run(["jupyter", "labextension", "list"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    out = listed.stdout + listed.stderr
    assert "@dicomlake/jupyterlab" in out and "enabled" in out and "OK" in out, out
    # the installed package serves OHIF from its own files (what `serve` does at /viewer/)
    served = subprocess.run(
        ["python", "-c", "import json; from dicomlake.dicomnet.viewer import ViewerSite\n"
         "site = ViewerSite('/viewer/', 'http://h/dicomweb')\n"
         "page, config = site.respond('viewer'), site.respond('app-config.js')\n"
         "print(json.dumps({'root': str(site.root), 'status': page.status,\n"
         "  'type': page.content_type, 'mounted': b'/viewer/app.bundle.' in page.body,\n"
         "  'ours': b'http://h/dicomweb' in config.body}))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert served.returncode == 0, served.stderr
    doc = json.loads(served.stdout)
    assert doc["root"].startswith(str(venv)), doc  # the wheel's copy, not this checkout's
    assert doc["status"] == 200 and doc["type"].startswith("text/html"), doc
    assert doc["mounted"] and doc["ours"], doc


def test_a_regular_install_ingests_from_the_repository_root(venv, tmp_path):
    """Spark's workers start in the current directory: the checkout must not shadow the
    installed package (it did: `No module named 'dicomlake.extension'`)."""
    from dicomlake.catalog.sample import Profile, make_sample

    archives = make_sample(tmp_path / "zips", archives=2, files=5, seed=3, profile=Profile.CTMR)
    env = _env(venv, tmp_path / "home")
    done = subprocess.run(["dicomlake", "ingest", str(tmp_path / "zips")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(archives) == 2
    from deltalake import DeltaTable

    instances = DeltaTable(str(tmp_path / "home" / "warehouse" / "dicom" / "instances"))
    assert instances.to_pyarrow_table().num_rows == 10
