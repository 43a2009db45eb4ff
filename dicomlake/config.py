"""Settings: where the lake lives, which Spark to use, and the one loader every section uses.

Every value has an embedded default so that nothing needs configuring on one machine; a TOML
file (``$DICOMLAKE_CONFIG`` or ``<home>/dicomlake.toml``) and ``DICOMLAKE_*`` environment
variables point the same code at real clusters. Values are read once, validated here, and
passed around as frozen objects rather than re-read from the environment by each module.

Each component declares its section as a frozen dataclass and reads it with
:func:`load_section`, so the file is found, typed and checked the same way everywhere: an
unknown section or key, or a value of the wrong type, is a :class:`ConfigError` naming the
file (or variable), the section and the key, and listing what is allowed. The core knows the
section names (so a misspelt ``[simlarity]`` is caught whichever component reads first) but
not the components' keys.
"""

from __future__ import annotations

import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from dicomlake.errors import ConfigError, MissingConfigError

DEFAULT_HOME = Path.home() / ".dicomlake"
"""Default root for the warehouse and scratch files (``$DICOMLAKE_HOME`` overrides it)."""

CONFIG_NAME = "dicomlake.toml"
"""The config file looked for in the lake home when none is named."""

TOP_LEVEL_KEYS = ("home",)
"""Plain values at the top of the file (everything else is a section)."""

SECTIONS = {
    "spark": "how to reach Spark (SparkSettings, this module)",
    "warehouse": "where the Delta tables live (this module)",
    "similarity": "embedding backend, code store, PQ (dicomlake.udfs.settings)",
    "stream": "Kafka and the Flink job (dicomlake.streaming.settings)",
    "dimse": "the DIMSE node: AE title, address, trusted AE titles (dicomlake.dicomnet.dimse)",
}
"""Every ``[section]`` a config file may hold, and who reads it."""

_SPARK_MASTER_PREFIXES = ("local", "spark://", "sc://", "k8s://", "yarn")

T = TypeVar("T")
E = TypeVar("E", bound=Enum)


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
            raise ConfigError(
                f"dicomlake setting 'spark.master' is {self.master!r}; it must start with one "
                f"of: {allowed}"
            )


@dataclass(frozen=True)
class _WarehouseSection:
    """``[warehouse]``: only the folder; ``Settings.warehouse_path`` supplies the default."""

    path: Path | None = None


@dataclass(frozen=True)
class Settings:
    """All core dicomlake settings, grouped by component.

    ``config_file`` is the file these settings came from (None: none was found), so the
    components' sections are read from that same file even when it was named as an argument.
    """

    home: Path = DEFAULT_HOME
    warehouse: Path | None = None
    spark: SparkSettings = field(default_factory=SparkSettings)
    config_file: Path | None = None

    @property
    def warehouse_path(self) -> Path:
        """Directory holding one sub-folder per schema, one Delta table per table."""
        return self.warehouse if self.warehouse is not None else self.home / "warehouse"


def choice(kind: type[E], value: object, key: str) -> E:
    """``value`` as a member of ``kind``; the error names the setting and the allowed values."""
    try:
        return kind(str(value).lower())
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise ConfigError(f"dicomlake setting '{key}' is {value!r}; it must be one of: "
                          f"{allowed}") from None


def find_config(home: Path, config_file: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read: ``config_file``, ``$DICOMLAKE_CONFIG``, or
    ``<home>/dicomlake.toml`` when it exists (None: run on defaults).

    Raises:
        MissingConfigError: a file named by argument or variable does not exist (a typo there
            must not silently fall back to the defaults).
    """
    named = config_file or os.environ.get("DICOMLAKE_CONFIG")
    if named:
        path = Path(named).expanduser()
        if not path.is_file():
            raise MissingConfigError(f"dicomlake config file {path} does not exist")
        return path
    default = home / CONFIG_NAME
    return default if default.is_file() else None


def read_config(path: Path | None) -> dict[str, Any]:
    """The parsed file, its top level checked: known sections (each a table) and keys only."""
    if path is None:
        return {}
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"dicomlake config file {path} is not valid TOML: {exc}") from exc
    for name, value in data.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"dicomlake config file {path}: '{name}' must be a section "
                                  f"([{name}]), got {value!r}")
        elif name not in TOP_LEVEL_KEYS:
            raise ConfigError(
                f"dicomlake config file {path}: unknown section or key '{name}'; valid "
                f"sections: {', '.join(f'[{s}]' for s in sorted(SECTIONS))}; valid top-level "
                f"keys: {', '.join(TOP_LEVEL_KEYS)}")
    return data


def load_section(settings: Settings, section: str, cls: type[T], *,
                 env: Mapping[str, str] | None = None) -> T:
    """``[section]`` of the settings' config file as a ``cls`` (a frozen dataclass).

    The file is ``settings.config_file``, else found as :func:`find_config` does, and read at
    every call (a long-lived process sees an edited file on its next load). Values come from
    the dataclass defaults, then the file, then the environment.

    Args:
        settings: the core settings (their home and config file).
        section: a name from :data:`SECTIONS`; sub-tables map to nested dataclass fields.
        cls: the dataclass whose init fields are the section's only valid keys.
        env: field (dotted for nested: ``"hbase.port"``) to the variable that overrides it;
            an empty variable counts as unset.

    Raises:
        ConfigError: unknown key, wrong type, or a rule of ``cls`` broken; the message names
            the file or variable, the section and the key.
        MissingConfigError: the named config file does not exist.
    """
    if section not in SECTIONS:
        raise ValueError(f"section [{section}] is not in dicomlake.config.SECTIONS")
    path = find_config(settings.home, settings.config_file)
    origin = f"dicomlake config file {path}" if path else "dicomlake settings (no config file)"
    return _build(cls, section, read_config(path).get(section, {}), dict(env or {}), origin)


def _build(cls: type[T], section: str, table: Mapping[str, Any], env: dict[str, str],
           origin: str) -> T:
    """One dataclass from a TOML table plus environment overrides, every value checked."""
    hints = get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]  # type: ignore[arg-type]
    for key in table:
        if key not in names:
            raise ConfigError(f"{origin}: unknown key '{key}' in section [{section}]; valid "
                              f"keys: {', '.join(sorted(names))}")
    for key in env:
        if key.split(".", 1)[0] not in names:
            raise ValueError(f"environment override of unknown setting '{section}.{key}'")
    values: dict[str, Any] = {}
    used: list[str] = []
    for name in names:
        hint = hints[name]
        if isinstance(hint, type) and is_dataclass(hint):
            sub = table.get(name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{origin}: '{section}.{name}' must be a section "
                                  f"([{section}.{name}]), got {sub!r}")
            sub_env = {k.split(".", 1)[1]: v for k, v in env.items()
                       if k.startswith(f"{name}.")}
            if sub or sub_env:
                values[name] = _build(hint, f"{section}.{name}", sub, sub_env, origin)
            continue
        variable = env.get(name, "")
        text = os.environ.get(variable) if variable else None
        if text:
            values[name] = _convert(text, hint, f"environment variable {variable}",
                                    f"{section}.{name}")
            used.append(variable)
        elif name in table:
            values[name] = _convert(table[name], hint, origin, f"{section}.{name}")
    try:
        return cls(**values)
    except ValueError as exc:  # a rule of the dataclass (ConfigError is a ValueError too)
        raise ConfigError(f"{origin}{_overrides(used)}, section [{section}]: {exc}") from None


def _overrides(variables: list[str]) -> str:
    return f" (with {', '.join(variables)} from the environment)" if variables else ""


def _convert(value: object, hint: Any, origin: str, key: str) -> Any:
    """``value`` as the field's declared type; TOML and environment text follow one rule."""
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return choice(hint, value, key)
        except ConfigError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    if get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: setting '{key}' must be a section ([{key}]), got "
                              f"{value!r}")
        return _flatten(value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is str and isinstance(value, str):
        return value
    elif hint is Path and isinstance(value, str):
        return Path(value).expanduser()
    if hint not in (int, str, Path):
        raise TypeError(f"dicomlake.config cannot read a {hint!r} setting ('{key}')")
    kind = {int: "an integer", str: "a string", Path: "a path (a string)"}[hint]
    raise ConfigError(f"{origin}: setting '{key}' must be {kind}, got {value!r}")


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Free-form ``key = value`` pairs (Spark conf) as text; a dotted key written unquoted
    (``spark.executor.memory = "8g"``) is a nested table in TOML and is joined back here."""
    flat: dict[str, str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        elif isinstance(value, bool):
            flat[name] = "true" if value else "false"
        else:
            flat[name] = str(value)
    return flat


def load_settings(config_file: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from defaults, the config file, then ``DICOMLAKE_*`` variables.

    ``DICOMLAKE_HOME``, ``DICOMLAKE_WAREHOUSE`` and ``DICOMLAKE_SPARK_MASTER`` override the
    file's ``home``, ``[warehouse] path`` and ``[spark] master``.

    Args:
        config_file: explicit TOML file; defaults to ``$DICOMLAKE_CONFIG`` or
            ``<home>/dicomlake.toml`` when that exists.

    Raises:
        ConfigError: the file is not valid TOML, holds an unknown section or key, or a value
            breaks its rule (a ``ValueError``).
        MissingConfigError: an explicitly named config file does not exist (a
            ``FileNotFoundError``).
    """
    env_home = os.environ.get("DICOMLAKE_HOME")
    home = Path(env_home or DEFAULT_HOME).expanduser()
    path = find_config(home, config_file)
    data = read_config(path)
    if not env_home and "home" in data:
        home = _convert(data["home"], Path, f"dicomlake config file {path}", "home")
    located = Settings(home=home, config_file=path)
    spark = load_section(located, "spark", SparkSettings,
                         env={"master": "DICOMLAKE_SPARK_MASTER"})
    warehouse = load_section(located, "warehouse", _WarehouseSection,
                             env={"path": "DICOMLAKE_WAREHOUSE"})
    return Settings(home=home, warehouse=warehouse.path, spark=spark, config_file=path)
