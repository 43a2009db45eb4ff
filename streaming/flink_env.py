"""The Flink job's own interpreter, for users who installed dicomlake with pip.

apache-flink 2.3 pins pyarrow<17 (through apache-beam), which pyspark 4.3 refuses, so the job
runs in a venv of its own (``flink-requirements.txt`` says what it holds). In a checkout
``make`` builds ``.venv-flink``; everyone else runs ``dicomlake stream setup``, which builds
the same under the lake's home (``<home>/flink/venv``). apache-flink 2.3 installs on Python
3.11 and 3.12 only (on 3.13 its dependencies do not build), so the venv may use another
interpreter than dicomlake itself: the job imports only pure-Python, pyspark-free modules.

dicomlake reaches that venv as a tree of links to the installed package (``<home>/flink/lib``
on a ``.pth`` path), not as a second install: the job then always runs the code of the
dicomlake that started it, editable checkouts included, where the subpackages live in other
folders (``catalog/`` is ``dicomlake.catalog``).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from dicomlake.errors import DicomlakeError

FLINK_PYTHONS = ((3, 11), (3, 12))
"""Interpreter versions apache-flink 2.3 installs on."""
SUBPACKAGES = ("catalog", "udfs", "sql", "streaming", "extension", "bench")


class FlinkEnvError(DicomlakeError):
    """The Flink interpreter cannot be built; the message says what to install or pass."""


def venv_dir(home: Path) -> Path:
    """Where ``dicomlake stream setup`` builds the Flink venv."""
    return home / "flink" / "venv"


def interpreter(home: Path) -> Path:
    """The Flink venv's python under the lake's home."""
    return venv_dir(home) / "bin" / "python"


def _version(python: str) -> tuple[int, int] | None:
    probe = subprocess.run([python, "-P", "-c", "import sys; print(*sys.version_info[:2])"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return None
    major, minor = probe.stdout.split()
    return int(major), int(minor)


def choose_python(requested: str | None) -> str:
    """``requested``, else this interpreter if Flink supports it, else python3.12/3.11."""
    wanted = " or ".join(f"{a}.{b}" for a, b in FLINK_PYTHONS)
    if requested:
        if _version(requested) not in FLINK_PYTHONS:
            raise FlinkEnvError(f"{requested} is not a Python {wanted} interpreter, which "
                                "apache-flink 2.3 needs")
        return requested
    if sys.version_info[:2] in FLINK_PYTHONS:
        return sys.executable
    for major, minor in reversed(FLINK_PYTHONS):
        found = shutil.which(f"python{major}.{minor}")
        if found and _version(found) == (major, minor):
            return found
    raise FlinkEnvError(f"apache-flink 2.3 needs Python {wanted}; this is "
                        f"{sys.version_info[0]}.{sys.version_info[1]} and neither python3.12 "
                        "nor python3.11 is on PATH. Install one and run `dicomlake stream "
                        "setup --python /path/to/python3.12`")


def link_package(lib: Path) -> Path:
    """Lay out ``lib/dicomlake`` as links to this process's dicomlake (see the module doc)."""
    import dicomlake

    target = lib / "dicomlake"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for entry in Path(dicomlake.__file__).resolve().parent.iterdir():
        if entry.name != "__pycache__":
            (target / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        if not (target / name).exists():
            spec = importlib.util.find_spec(f"dicomlake.{name}")
            if spec is None or not spec.submodule_search_locations:
                raise FlinkEnvError(f"dicomlake.{name} is not importable here; reinstall "
                                    "dicomlake")
            (target / name).symlink_to(Path(next(iter(spec.submodule_search_locations))))
    return target


def build(home: Path, python: str | None = None,
          say: Callable[[str], None] = print) -> Path:
    """Build (or refresh) the Flink venv under ``home``; returns its interpreter."""
    base = choose_python(python)
    venv = venv_dir(home)
    say(f"building the Flink interpreter in {venv} from {base} (apache-flink, ~1.3 GB)")
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    python_path = str(interpreter(home))
    requirements = resources.files("dicomlake.streaming") / "flink-requirements.txt"
    with resources.as_file(requirements) as path:
        subprocess.run([python_path, "-m", "pip", "install", "--disable-pip-version-check",
                        "-q", "-r", str(path)], check=True)
    lib = home / "flink" / "lib"
    link_package(lib)
    site = subprocess.run([python_path, "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True)
    (Path(site.stdout.strip()) / "dicomlake-link.pth").write_text(f"{lib}\n")
    check = subprocess.run([python_path, "-P", "-c", "import pyflink, dicomlake.streaming.job"],
                           capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise FlinkEnvError(f"the Flink venv {venv} was built but cannot import the job's "
                            f"modules:\n{check.stderr[-2000:]}")
    return interpreter(home)
