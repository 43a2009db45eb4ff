"""The ``dicomlake`` command.

Each component contributes its commands from its own ``commands`` module; this file only
assembles them, so adding a capability never means editing another component's CLI code.
"""

from __future__ import annotations

import importlib

import click

from dicomlake import __version__

COMMAND_MODULES = (
    "dicomlake.catalog.commands",
    "dicomlake.bench.commands",
    "dicomlake.udfs.commands",
    "dicomlake.demo",
    "dicomlake.sql.commands",
    "dicomlake.extension.commands",
    "dicomlake.streaming.commands",
    "dicomlake.dicomnet.commands",
)
"""Modules exposing ``COMMANDS``: a list of click commands/groups added to ``dicomlake``."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dicomlake")
def main() -> None:
    """dicomlake: DICOM archives as SQL tables, searchable by image similarity."""


for _module in COMMAND_MODULES:
    for _command in importlib.import_module(_module).COMMANDS:
        main.add_command(_command)
