"""Settings: embedded defaults, the TOML file, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomlake.config import SparkSettings, load_settings


def test_defaults_need_no_configuration(monkeypatch, tmp_path):
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))
    monkeypatch.delenv("DICOMLAKE_CONFIG", raising=False)
    monkeypatch.delenv("DICOMLAKE_SPARK_MASTER", raising=False)
    monkeypatch.delenv("DICOMLAKE_WAREHOUSE", raising=False)
    settings = load_settings()
    assert settings.spark.master == "local[*]"
    assert settings.warehouse_path == tmp_path / "warehouse"


def test_file_then_environment(monkeypatch, tmp_path):
    config = tmp_path / "dicomlake.toml"
    config.write_text('[spark]\nmaster = "spark://db1:7077"\n[spark.conf]\n'
                      '"spark.executor.memory" = "16g"\n[warehouse]\npath = "/lake"\n')
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))
    monkeypatch.delenv("DICOMLAKE_SPARK_MASTER", raising=False)
    monkeypatch.delenv("DICOMLAKE_WAREHOUSE", raising=False)
    settings = load_settings()
    assert settings.spark.master == "spark://db1:7077"
    assert settings.spark.conf == {"spark.executor.memory": "16g"}
    assert settings.warehouse_path == Path("/lake")
    monkeypatch.setenv("DICOMLAKE_SPARK_MASTER", "sc://connect:15002")
    assert load_settings().spark.master == "sc://connect:15002"


def test_bad_toml_names_the_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[spark\nmaster=")
    with pytest.raises(ValueError, match=f"config file {config} is not valid TOML"):
        load_settings(config)


def test_missing_named_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_unknown_master_lists_the_allowed_forms():
    with pytest.raises(ValueError, match=r"'spark.master' is 'mesos://x'.*spark://"):
        SparkSettings(master="mesos://x")
