"""Shared fixtures: ONE Spark session per test run, small sample data made once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from dicomlake.catalog.sample import Profile, make_sample
from dicomlake.config import Settings

# Fuzzing budget: 300 examples per property in CI; HYPOTHESIS_PROFILE=deep for 5,000.
hypothesis_settings.register_profile("ci", max_examples=300)
hypothesis_settings.register_profile("deep", max_examples=5000)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LEFT_OUT_EXTRAS = frozenset(filter(None, os.environ.get("DICOMLAKE_TESTS_WITHOUT", "").split(",")))
"""Extras this interpreter's venv leaves out on purpose (`make test-second` names them). Only
tests marked ``extra(name)`` for those are skipped, by name; anywhere else a missing extra
fails the tests that need it, so the main suite can never skip one quietly."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for mark in item.iter_markers("extra"):
            if mark.args[0] in LEFT_OUT_EXTRAS:
                item.add_marker(pytest.mark.skip(
                    reason=f"the [{mark.args[0]}] extra is left out of this venv "
                           "(DICOMLAKE_TESTS_WITHOUT); the main suite tests it"))


@pytest.fixture(scope="session")
def lake_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private DICOMLAKE_HOME for the whole run (never the user's ~/.dicomlake)."""
    home = tmp_path_factory.mktemp("dicomlake-home")
    os.environ["DICOMLAKE_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def settings(lake_home: Path) -> Settings:
    return Settings(home=lake_home)


@pytest.fixture(scope="session")
def spark(settings: Settings):
    """The run's only Spark session (local[2]); tests must not stop it."""
    from dicomlake.config import SparkSettings
    from dicomlake.session import build_session

    session = build_session(Settings(home=settings.home,
                                     spark=SparkSettings(master="local[2]", driver_memory="2g")))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample_archives(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small mixed-profile archives (20 files each), made once per run."""
    out = tmp_path_factory.mktemp("samples")
    return make_sample(out, archives=3, files=20, seed=3, profile=Profile.MIXED, workers=1)


@pytest.fixture(scope="module")
def servers(request, spark, settings, sample_archives, tmp_path_factory):
    """The run's JupyterLab + ``dicomlake serve`` on the shared lab lake
    (:func:`_extension_helpers.lab_servers`), with everyone mapped to the default SQL user
    again for this module (an earlier module may have changed the mapping)."""
    from _extension_helpers import lab_servers

    servers = lab_servers(request, spark, settings, sample_archives, tmp_path_factory)
    servers.default_identity()
    return servers
