"""Whose eyes may see pixels: the one rule for burned-in annotations.

An image whose BurnedInAnnotation (0028,0301) is YES carries identifying text in its pixels
(names, dates, ids stamped into ultrasound and screenshot frames), which no header
de-identification removes. Views that must not show identifiers (analysts, who are answered
from ``dicom_deid``) therefore get no pixel data of such images at all: no frames, no
rendered or thumbnail pictures, no instance files. Every path that hands pixels to a role
asks :func:`pixels_allowed`, so the rule lives here once.
"""

from __future__ import annotations

__all__ = ["pixels_allowed", "withheld_reason"]


def pixels_allowed(burned_in_annotation: str | None, *, deidentified: bool) -> bool:
    """Whether a view may receive an image's pixels.

    Args:
        burned_in_annotation: the image's BurnedInAnnotation value (None when absent).
        deidentified: whether the view must not show identifiers (the ``dicom_deid`` scope).
    """
    if not deidentified:
        return True
    return (burned_in_annotation or "").strip().upper() != "YES"


def withheld_reason(sop_instance_uid: str) -> str:
    """What a refused client is told (the same words on every path)."""
    return (f"pixel data of instance {sop_instance_uid} is withheld: its BurnedInAnnotation "
            "(0028,0301) is YES, so its pixels may show identifiers, which this role must "
            "not see")
