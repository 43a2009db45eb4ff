"""One error base: every exception class the project defines derives from DicomlakeError.

The test imports every module of the distribution (the packages ``pyproject.toml`` ships, so
a new subpackage is covered without editing this file) and inspects the classes each module
defines. A module whose optional dependency is not installed in this interpreter (pyflink
lives in ``.venv-flink``) is skipped and named; an import failure inside dicomlake itself fails.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from dicomlake.errors import ConfigError, DicomlakeError, MissingConfigError

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

SECOND_BASES = {
    "dicomlake.streaming.messages.BadMessageError": ValueError,
    "dicomlake.streaming.broker.BrokerError": RuntimeError,
    "dicomlake.streaming.runner.StreamError": RuntimeError,
    "dicomlake.extension.browse_sql.BrowseInputError": ValueError,
    "dicomlake.extension.upload.UploadError": ValueError,
    "dicomlake.dicomnet.matching.MatchError": ValueError,
    "dicomlake.dicomnet.wado.NotAcceptable": ValueError,
}
"""Standard bases callers catch today; the rebase onto DicomlakeError must keep them."""


def _project_modules() -> tuple[list[ModuleType], list[str]]:
    """Every importable module of the shipped packages, and those skipped for missing deps."""
    packages = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]
    modules: dict[str, ModuleType] = {}
    skipped: list[str] = []
    for name in packages:
        package = importlib.import_module(name)
        modules[name] = package
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported
                continue
            try:
                modules[info.name] = importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] == "dicomlake":
                    raise
                skipped.append(f"{info.name} (needs {exc.name})")
    return list(modules.values()), skipped


@pytest.fixture(scope="module")
def project_exceptions() -> dict[str, type[BaseException]]:
    """Exception classes defined (not imported) by project modules, by qualified name."""
    modules, skipped = _project_modules()
    for line in skipped:
        print(f"skipped module: {line}")
    found: dict[str, type[BaseException]] = {}
    for module in modules:
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{obj.__qualname__}"] = obj
    return found


def test_every_project_exception_derives_from_dicomlake_error(project_exceptions):
    """Private classes (``_NeedMore``) are control-flow signals caught in their own module;
    if one escapes it is a bug, which ``except DicomlakeError`` must not swallow."""
    strays = []
    for name, cls in sorted(project_exceptions.items()):
        if issubclass(cls, DicomlakeError):
            continue
        if cls.__name__.startswith("_"):
            print(f"private control-flow exception, not a DicomlakeError: {name}")
        else:
            strays.append(name)
    assert not strays, f"exceptions not derived from dicomlake.errors.DicomlakeError: {strays}"


def test_the_walk_found_every_component(project_exceptions):
    """Guards the walk itself: an empty or partial walk would make the test above pass."""
    expected = {
        "dicomlake.errors.ConfigError",
        "dicomlake.catalog.errors.HeaderError",
        "dicomlake.catalog.deid.DeidError",
        "dicomlake.udfs.errors.CodeStoreError",
        "dicomlake.sql.errors.QueryError",
        "dicomlake.streaming.runner.StreamError",
        "dicomlake.extension.sqlclient.SqlClientError",
        "dicomlake.extension.identities.IdentityError",
        *SECOND_BASES,
    }
    assert expected <= set(project_exceptions)


@pytest.mark.parametrize("name", sorted(SECOND_BASES))
def test_rebased_errors_keep_their_standard_base(project_exceptions, name):
    cls = project_exceptions[name]
    assert issubclass(cls, DicomlakeError) and issubclass(cls, SECOND_BASES[name])


def test_one_base_object_whatever_the_import_path():
    """Older code imports the base from the catalog or the similarity stack."""
    from dicomlake.catalog import DicomlakeError as from_catalog
    from dicomlake.catalog.errors import DicomlakeError as from_catalog_errors
    from dicomlake.udfs.errors import DicomlakeError as from_udfs

    assert from_catalog is from_catalog_errors is from_udfs is DicomlakeError


def test_config_errors_are_caught_both_ways():
    """Callers written before ConfigError catch ValueError / FileNotFoundError."""
    assert issubclass(ConfigError, ValueError)
    assert issubclass(MissingConfigError, FileNotFoundError)
    assert issubclass(ConfigError, DicomlakeError) and issubclass(MissingConfigError,
                                                                  DicomlakeError)
