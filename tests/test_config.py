"""Settings: embedded defaults, the TOML file, environment overrides, clear errors.

Every section (core, ``[similarity]``, ``[stream]``) goes through one loader, so each rule is
proved once here for all of them: unknown sections and keys are refused, wrong types are
refused, and every message names the file (or variable), the section and the key.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dicomlake.config import Settings, SparkSettings, load_settings
from dicomlake.errors import ConfigError, MissingConfigError
from dicomlake.streaming.settings import load_stream
from dicomlake.udfs.settings import CodeStoreKind, ModelBackend, load_similarity


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No DICOMLAKE_* variable of the caller's shell leaks in; the home is the test's folder."""
    for name in list(os.environ):
        if name.startswith("DICOMLAKE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path))


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dicomlake.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_configuration(tmp_path):
    settings = load_settings()
    assert settings.spark.master == "local[*]"
    assert settings.warehouse_path == tmp_path / "warehouse"
    assert settings.config_file is None
    assert load_similarity(settings).code_store is CodeStoreKind.DELTA
    assert load_stream(settings).topic == "imageupload"


def test_file_then_environment(monkeypatch, tmp_path):
    path = _config(tmp_path, '[spark]\nmaster = "spark://db1:7077"\n[spark.conf]\n'
                             '"spark.executor.memory" = "16g"\n[warehouse]\npath = "/lake"\n')
    settings = load_settings()
    assert settings.spark.master == "spark://db1:7077"
    assert settings.spark.conf == {"spark.executor.memory": "16g"}
    assert settings.warehouse_path == Path("/lake")
    assert settings.config_file == path
    monkeypatch.setenv("DICOMLAKE_SPARK_MASTER", "sc://connect:15002")
    monkeypatch.setenv("DICOMLAKE_WAREHOUSE", str(tmp_path / "w"))
    settings = load_settings()
    assert settings.spark.master == "sc://connect:15002"
    assert settings.warehouse_path == tmp_path / "w"


def test_spark_conf_dotted_keys_and_non_text_values(tmp_path):
    """Unquoted dotted keys are nested tables in TOML; Spark wants them as one flat name."""
    _config(tmp_path, '[spark.conf]\nspark.executor.memory = "8g"\n'
                      "spark.executor.cores = 4\nspark.sql.adaptive.enabled = false\n")
    assert load_settings().spark.conf == {"spark.executor.memory": "8g",
                                          "spark.executor.cores": "4",
                                          "spark.sql.adaptive.enabled": "false"}


def test_home_from_the_file_unless_the_environment_names_one(monkeypatch, tmp_path):
    path = tmp_path / "etc.toml"
    path.write_text(f'home = "{tmp_path / "lake"}"\n')
    monkeypatch.delenv("DICOMLAKE_HOME")
    assert load_settings(path).home == tmp_path / "lake"
    monkeypatch.setenv("DICOMLAKE_HOME", str(tmp_path / "other"))
    assert load_settings(path).home == tmp_path / "other"


def test_sections_come_from_the_file_the_settings_came_from(tmp_path):
    """A file named as an argument is the one the components read, not <home>/dicomlake.toml."""
    _config(tmp_path, "[similarity]\nm = 8\n")
    named = tmp_path / "named.toml"
    named.write_text('[similarity]\nm = 16\nbackend = "tensorflow"\n[stream]\ntopic = "t2"\n')
    settings = load_settings(named)
    assert settings.config_file == named
    similarity = load_similarity(settings)
    assert (similarity.m, similarity.backend) == (16, ModelBackend.TENSORFLOW)
    assert load_stream(settings).topic == "t2"
    assert load_similarity(load_settings()).m == 8


def test_bad_toml_names_the_file(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[spark\nmaster=")
    with pytest.raises(ValueError, match=f"config file {config} is not valid TOML"):
        load_settings(config)


def test_missing_named_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(MissingConfigError, match=f"{missing} does not exist"):
        load_settings(missing)
    with pytest.raises(FileNotFoundError):  # what callers written before MissingConfigError catch
        load_settings(missing)


def test_missing_file_named_by_the_variable_fails_in_every_section(monkeypatch, tmp_path):
    """A typo in $DICOMLAKE_CONFIG must not leave one component silently on its defaults."""
    monkeypatch.setenv("DICOMLAKE_CONFIG", str(tmp_path / "nope.toml"))
    settings = Settings(home=tmp_path)
    for load in (load_settings, lambda: load_similarity(settings),
                 lambda: load_stream(settings)):
        with pytest.raises(MissingConfigError, match=r"nope\.toml does not exist"):
            load()


def test_unknown_master_lists_the_allowed_forms():
    with pytest.raises(ValueError, match=r"'spark.master' is 'mesos://x'.*spark://"):
        SparkSettings(master="mesos://x")


def test_unknown_section_names_the_file_and_the_valid_sections(tmp_path):
    path = _config(tmp_path, "[simlarity]\nm = 16\n")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert str(path) in message and "'simlarity'" in message
    assert "[similarity], [spark], [stream], [warehouse]" in message


def test_section_that_is_a_value_is_refused(tmp_path):
    path = _config(tmp_path, 'spark = "local[2]"\n')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: 'spark' must be a section"):
        load_settings()


@pytest.mark.parametrize(("text", "section", "key", "load"), [
    ('[spark]\nmastr = "local[2]"\n', "spark", "mastr", load_settings),
    ('[warehouse]\ndir = "/lake"\n', "warehouse", "dir", load_settings),
    ("[similarity]\nmm = 16\n", "similarity", "mm", lambda: load_similarity(load_settings())),
    ('[similarity.hbase]\nhots = "h"\n', "similarity.hbase", "hots",
     lambda: load_similarity(load_settings())),
    ('[stream]\nbootstrap = "k:9092"\n', "stream", "bootstrap",
     lambda: load_stream(load_settings())),
])
def test_unknown_key_names_file_section_key_and_valid_keys(tmp_path, text, section, key, load):
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load()
    message = str(caught.value)
    assert str(path) in message
    assert f"unknown key '{key}' in section [{section}]; valid keys: " in message


def test_valid_keys_are_listed(tmp_path):
    _config(tmp_path, "[stream]\ntopik = 'x'\n")
    with pytest.raises(ConfigError, match=r"valid keys: .*bootstrap_servers.*topic"):
        load_stream(load_settings())


@pytest.mark.parametrize(("text", "pattern"), [
    ('[similarity]\nm = "many"\n', r"'similarity\.m' must be an integer, got 'many'"),
    ("[similarity]\nm = 16.5\n", r"'similarity\.m' must be an integer, got 16\.5"),
    ("[similarity]\nm = true\n", r"'similarity\.m' must be an integer, got True"),
    ("[similarity.hbase]\nhost = 9090\n", r"'similarity\.hbase\.host' must be a string"),
    ('[similarity]\ncode_store = "redis"\n',
     r"'similarity\.code_store' is 'redis'; it must be one of: delta, hbase"),
    ("[spark]\ndriver_memory = 4\n", r"'spark\.driver_memory' must be a string, got 4"),
    ("[warehouse]\npath = 1\n", r"'warehouse\.path' must be a path"),
    ('[spark]\nconf = "x"\n', r"'spark\.conf' must be a section"),
])
def test_wrong_type_names_the_file_and_the_key(tmp_path, text, pattern):
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^dicomlake config file {re.escape(str(path))}: .*"
                                          f"{pattern}"):
        load_similarity(load_settings())


def test_broken_rule_names_the_file_and_section(tmp_path):
    path = _config(tmp_path, "[stream]\npartitions = 0\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}, section \[stream\]: "
                                          r".*'stream\.partitions' must be > 0, got 0"):
        load_stream(load_settings())


def test_environment_errors_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("DICOMLAKE_HBASE_PORT", "ninety")
    with pytest.raises(ConfigError, match=r"^environment variable DICOMLAKE_HBASE_PORT: "
                                          r"setting 'similarity\.hbase\.port' must be an integer"):
        load_similarity(load_settings())
    monkeypatch.setenv("DICOMLAKE_HBASE_PORT", "9091")
    monkeypatch.setenv("DICOMLAKE_CODE_STORE", "hbase")
    monkeypatch.setenv("DICOMLAKE_HBASE_EMULATOR", "127.0.0.1:8086")
    similarity = load_similarity(load_settings())
    assert similarity.code_store is CodeStoreKind.HBASE
    assert (similarity.hbase.port, similarity.hbase.emulator) == (9091, "127.0.0.1:8086")


def test_stream_file_environment_and_default_interpreter(monkeypatch, tmp_path):
    _config(tmp_path, '[stream]\nbootstrap_servers = "k1:9092"\npartitions = 3\n'
                      'flink_python = ""\n')
    stream = load_stream(load_settings())
    assert (stream.bootstrap_servers, stream.partitions) == ("k1:9092", 3)
    assert stream.flink_python  # the .venv-flink interpreter or this one, never empty
    monkeypatch.setenv("DICOMLAKE_KAFKA_BOOTSTRAP", "k2:9092")
    monkeypatch.setenv("DICOMLAKE_FLINK_PYTHON", "/opt/flink/python")
    stream = load_stream(load_settings())
    assert (stream.bootstrap_servers, stream.flink_python) == ("k2:9092", "/opt/flink/python")
