"""The one base of every error dicomlake raises, and the settings errors of the core.

Every component derives its exceptions from :class:`DicomlakeError` (keeping a standard base
such as ``ValueError`` beside it where callers already catch that), so a command, a server or a
notebook can catch everything the project raises with one ``except`` and let genuine bugs
(``TypeError``, ``KeyError`` from our own code) through. The module imports nothing, so any
interpreter (Spark workers, the Flink job's own venv) can load it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DicomlakeError", "MissingConfigError"]


class DicomlakeError(Exception):
    """Base of dicomlake's own errors."""


class ConfigError(DicomlakeError, ValueError):
    """A setting cannot be used; the message names the file (or variable), section and key.

    It is a ``ValueError`` too because a bad setting is a bad value, and callers written before
    this class existed catch ``ValueError``.
    """


class MissingConfigError(DicomlakeError, FileNotFoundError):
    """An explicitly named config file (argument or ``$DICOMLAKE_CONFIG``) does not exist.

    Only a file the user named is an error; ``<home>/dicomlake.toml`` is optional.
    """
