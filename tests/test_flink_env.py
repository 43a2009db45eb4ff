"""``dicomlake stream setup``: a pip user gets the Flink job's interpreter with one command."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicomlake.cli import main
from dicomlake.streaming import flink_env


def test_the_link_tree_resolves_every_subpackage_to_this_dicomlake(tmp_path):
    import dicomlake.catalog
    import dicomlake.streaming

    flink_env.link_package(tmp_path)
    flink_env.link_package(tmp_path)  # a second setup replaces the tree
    root = PathFinder.find_spec("dicomlake", [str(tmp_path)])
    assert root is not None and root.submodule_search_locations
    inside = list(root.submodule_search_locations)
    for name, module in (("catalog", dicomlake.catalog), ("streaming", dicomlake.streaming)):
        spec = PathFinder.find_spec(f"dicomlake.{name}", inside)
        assert spec is not None and spec.origin is not None
        assert Path(spec.origin).resolve() == Path(module.__file__).resolve()
    assert (tmp_path / "dicomlake" / "streaming" / "flink-requirements.txt").exists()


def test_an_interpreter_flink_cannot_use_is_refused_with_what_to_do(tmp_path):
    fake = tmp_path / "python3.13"
    fake.write_text("#!/bin/sh\necho 3 13\n")
    fake.chmod(0o755)
    with pytest.raises(flink_env.FlinkEnvError, match=r"3\.11 or 3\.12"):
        flink_env.choose_python(str(fake))


def test_starting_the_stream_without_an_interpreter_says_how_to_build_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))
    monkeypatch.setenv("DICOMLAKE_FLINK_PYTHON", str(tmp_path / "nowhere" / "python"))
    from dicomlake.config import load_settings
    from dicomlake.streaming.runner import StreamError, _check_interpreter
    from dicomlake.streaming.settings import load_stream

    stream = load_stream(load_settings())
    with pytest.raises(StreamError, match="dicomlake stream setup"):
        _check_interpreter(Path(stream.flink_python), load_settings())
    monkeypatch.setenv("DICOMLAKE_FLINK_PYTHON", sys.executable)  # no pyflink in this venv
    with pytest.raises(StreamError, match=r"cannot run the job \(.*pyflink.*dicomlake stream "
                                          r"setup"):
        _check_interpreter(Path(sys.executable), load_settings())


@pytest.mark.slow
def test_stream_setup_builds_an_interpreter_that_imports_the_job(tmp_path, monkeypatch):
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))
    monkeypatch.delenv("DICOMLAKE_FLINK_PYTHON", raising=False)
    result = CliRunner().invoke(main, ["stream", "setup"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    python = flink_env.interpreter(tmp_path)
    assert str(python) in result.output
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([str(python), "-c", "import pyflink, pyarrow, dicomlake.streaming.job, "
                           "dicomlake.streaming.processor as p; print(p.__file__)"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    import dicomlake.streaming.processor

    assert Path(done.stdout.strip()).resolve() == Path(
        dicomlake.streaming.processor.__file__).resolve()
