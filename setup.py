"""Build hook for the JupyterLab front end; all other metadata lives in pyproject.toml.

``pip install .`` must give a JupyterLab that shows the dicomlake sidebar with no extra
step, so building the package also builds the TypeScript front end (``npm install`` + ``npm run
build``, see package.json) into ``extension/labextension`` and installs it as shared data:
``share/jupyter/labextensions/@dicomlake/jupyterlab`` for JupyterLab to load and
``etc/jupyter/jupyter_server_config.d/dicomlake.json`` to enable the server extension.
The build is skipped when the output is newer than every source file. Set
``DICOMLAKE_SKIP_LABEXTENSION=1`` to build a package without the front end (no Node.js).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LABEXTENSION = ROOT / "extension" / "labextension"
LABEXTENSION_NAME = "@dicomlake/jupyterlab"
SOURCES = ("package.json", "package-lock.json", "tsconfig.json", "extension/src",
           "extension/style", "extension/schema")
SERVER_CONFIG = "extension/jupyter-config/jupyter_server_config.d/dicomlake.json"

install_data = Distribution().get_command_class("install_data")
"""The install_data command class (setuptools' own, without importing distutils here)."""


def _newest_source() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        newest = max([newest, *(p.stat().st_mtime for p in files)])
    return newest


def build_labextension() -> None:
    """Build the front end unless it is up to date (or the build is switched off)."""
    if os.environ.get("DICOMLAKE_SKIP_LABEXTENSION") == "1":
        return
    marker = LABEXTENSION / "package.json"
    if marker.exists() and marker.stat().st_mtime >= _newest_source():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "dicomlake: npm is required to build the JupyterLab extension (Node.js 18+); "
            "install Node.js, or set DICOMLAKE_SKIP_LABEXTENSION=1 to build without it")
    installed = ROOT / "node_modules" / ".package-lock.json"
    lock = ROOT / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        # `npm install` (from the lock), not `npm ci`: the registry here lacks rspack's
        # optional bindings for other platforms, so the lock cannot list them and ci refuses
        subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=ROOT, check=True)
    subprocess.run([npm, "run", "build:prod"], cwd=ROOT, check=True)


def data_files() -> list[tuple[str, list[str]]]:
    """The built front end and the server-extension switch, as install-relative folders."""
    out: dict[str, list[str]] = {}
    if LABEXTENSION.is_dir():
        for path in sorted(LABEXTENSION.rglob("*")):
            if path.is_file():
                rel = path.parent.relative_to(LABEXTENSION)
                target = Path("share/jupyter/labextensions", LABEXTENSION_NAME, rel)
                out.setdefault(target.as_posix(), []).append(
                    path.relative_to(ROOT).as_posix())
    out["etc/jupyter/jupyter_server_config.d"] = [SERVER_CONFIG]
    return sorted(out.items())


class BuildPyWithLabextension(build_py):
    """``build_py`` that first builds the front end (so sdists and wheels carry it)."""

    def run(self) -> None:
        build_labextension()
        super().run()


class InstallDataWithLabextension(install_data):  # type: ignore[misc,valid-type]
    """``install_data`` that lists the front end's files when it runs, after the build.

    The list given to ``setup()`` is taken before anything is built, so a fresh checkout
    would otherwise install an empty front end.
    """

    def run(self) -> None:
        build_labextension()
        self.data_files = data_files()
        super().run()


setup(cmdclass={"build_py": BuildPyWithLabextension, "install_data": InstallDataWithLabextension},
      data_files=data_files())
