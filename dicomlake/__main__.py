"""``python -m dicomlake`` is the ``dicomlake`` command."""

from dicomlake.cli import main

main()
