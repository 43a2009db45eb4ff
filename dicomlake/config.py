"""Settings: where the lake lives and which Spark to use.

Every value has an embedded default so that nothing needs configuring on one machine; a TOML
file (``$DICOMLAKE_CONFIG`` or ``<home>/dicomlake.toml``) and ``DICOMLAKE_*`` environment
variables point the same code at real clusters. Values are read once, validated here, and
passed around as a frozen object rather than re-read from the environment by each module.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_HOME = Path.home() / ".dicomlake"
"""Default root for the warehouse and scratch files (``$DICOMLAKE_HOME`` overrides it)."""

_SPARK_MASTER_PREFIXES = ("local", "spark://", "sc://", "k8s://", "yarn")


@dataclass(frozen=True)
class SparkSettings:
    """How to reach Spark.

    ``master`` is ``local[*]`` (in-process) by default; ``spark://`` and ``k8s://`` URLs go to
    a cluster, ``sc://`` to a Spark Connect server. ``conf`` entries are passed verbatim.
    """

    master: str = "local[*]"
    driver_memory: str = "4g"
    conf: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.master.startswith(_SPARK_MASTER_PREFIXES):
            allowed = ", ".join(_SPARK_MASTER_PREFIXES)
            raise ValueError(
                f"dicomlake setting 'spark.master' is {self.master!r}; it must start with one "
                f"of: {allowed}"
            )


@dataclass(frozen=True)
class Settings:
    """All dicomlake settings, grouped by component."""

    home: Path = DEFAULT_HOME
    warehouse: Path | None = None
    spark: SparkSettings = field(default_factory=SparkSettings)

    @property
    def warehouse_path(self) -> Path:
        """Directory holding one sub-folder per schema, one Delta table per table."""
        return self.warehouse if self.warehouse is not None else self.home / "warehouse"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"dicomlake config file {path} is not valid TOML: {exc}") from exc


def config_section(home: Path, section: str) -> dict[str, Any]:
    """One ``[section]`` of the config file (``$DICOMLAKE_CONFIG`` or ``<home>/dicomlake.toml``).

    Components with their own settings (``[similarity]``, ``[stream]``) read them through
    this, so the file is found and its errors are reported the same way everywhere.
    """
    named = os.environ.get("DICOMLAKE_CONFIG")
    path = Path(named).expanduser() if named else home / "dicomlake.toml"
    if not path.is_file():
        return {}
    return dict(_read_toml(path).get(section, {}))


E = TypeVar("E", bound=Enum)


def choice(kind: type[E], value: object, key: str) -> E:
    """``value`` as a member of ``kind``; the error names the setting and the allowed values."""
    try:
        return kind(str(value).lower())
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"dicomlake setting '{key}' is {value!r}; it must be one of: "
                         f"{allowed}") from None


def load_settings(config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from defaults, the config file, then ``DICOMLAKE_*`` variables.

    Args:
        config_file: explicit TOML file; defaults to ``$DICOMLAKE_CONFIG`` or
            ``<home>/dicomlake.toml`` when that exists.

    Raises:
        ValueError: the file is not valid TOML or a value breaks its rule.
        FileNotFoundError: an explicitly named config file does not exist.
    """
    home = Path(os.environ.get("DICOMLAKE_HOME", DEFAULT_HOME)).expanduser()
    named = config_file or os.environ.get("DICOMLAKE_CONFIG")
    if named is not None:
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"dicomlake config file {path} does not exist")
        data = _read_toml(path)
    elif (home / "dicomlake.toml").is_file():
        data = _read_toml(home / "dicomlake.toml")
    else:
        data = {}

    home = Path(data.get("home", home)).expanduser()
    spark_cfg = dict(data.get("spark", {}))
    master = os.environ.get("DICOMLAKE_SPARK_MASTER", spark_cfg.get("master", "local[*]"))
    conf = {str(k): str(v) for k, v in dict(spark_cfg.get("conf", {})).items()}
    warehouse = os.environ.get("DICOMLAKE_WAREHOUSE", data.get("warehouse", {}).get("path"))
    return Settings(
        home=home,
        warehouse=Path(warehouse).expanduser() if warehouse else None,
        spark=SparkSettings(
            master=master,
            driver_memory=str(spark_cfg.get("driver_memory", "4g")),
            conf=conf,
        ),
    )
