"""dicomlake: a SQL-first lakehouse for DICOM images packed in ZIP archives.

The public surface is small on purpose: build a Spark session that knows the catalog,
then use SQL (``SELECT * FROM dicom.instances``) or the ``dicom`` data source.
"""

from __future__ import annotations

from dicomlake.config import Settings, load_settings
from dicomlake.extension.browse import browse
from dicomlake.session import build_session

__all__ = ["Settings", "browse", "build_session", "load_settings"]
__version__ = "0.1.0"
