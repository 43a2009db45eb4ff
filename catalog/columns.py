"""Columns shared by every path that turns a DICOM header into a ``dicom.instances`` row.

Kept free of pyspark so the streaming job (its own interpreter, without Spark) builds rows
with exactly the code the ``dicom`` data source uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicomlake.catalog.header import Header

TABLE_COLUMN = "_dicomlake_table"
"""Routing column: which target table a row belongs to when one job writes several tables."""

# (column, tag, kind) for the typed columns analysts filter on; the whole header stays in meta.
PROMOTED: tuple[tuple[str, int, str], ...] = (
    ("sop_instance_uid", 0x00080018, "str"),
    ("sop_class_uid", 0x00080016, "str"),
    ("study_instance_uid", 0x0020000D, "str"),
    ("series_instance_uid", 0x0020000E, "str"),
    ("patient_id", 0x00100020, "str"),
    ("patient_name", 0x00100010, "name"),
    ("patient_sex", 0x00100040, "str"),
    ("patient_birth_date", 0x00100030, "date"),
    ("study_date", 0x00080020, "date"),
    ("study_time", 0x00080030, "str"),
    ("study_id", 0x00200010, "str"),
    ("study_description", 0x00081030, "str"),
    ("accession_number", 0x00080050, "str"),
    ("series_number", 0x00200011, "int"),
    ("series_description", 0x0008103E, "str"),
    ("instance_number", 0x00200013, "int"),
    ("modality", 0x00080060, "str"),
    ("body_part_examined", 0x00180015, "str"),
    ("manufacturer", 0x00080070, "str"),
    ("manufacturer_model_name", 0x00081090, "str"),
    ("institution_name", 0x00080080, "str"),
    ("rows", 0x00280010, "int"),
    ("columns", 0x00280011, "int"),
    ("number_of_frames", 0x00280008, "int"),
    ("samples_per_pixel", 0x00280002, "int"),
    ("bits_allocated", 0x00280100, "int"),
    ("photometric_interpretation", 0x00280004, "str"),
    ("pixel_spacing", 0x00280030, "floats"),
    ("slice_thickness", 0x00180050, "float"),
    ("image_position_patient", 0x00200032, "floats"),
    ("image_orientation_patient", 0x00200037, "floats"),
    ("window_center", 0x00281050, "float"),
    ("window_width", 0x00281051, "float"),
    ("rescale_intercept", 0x00281052, "float"),
    ("rescale_slope", 0x00281053, "float"),
)
_PROMOTED_KEYS = {tag: f"{tag:08X}" for _, tag, _ in PROMOTED}


def _person_name(value: object) -> str | None:
    """A PN value as DICOM writes it (``Alphabetic=Ideographic=Phonetic``, trailing empty
    groups dropped), the text pydicom gives: ``Yamada^Tarou=山田^太郎=やまだ^たろう``."""
    if not isinstance(value, dict):
        return None
    groups = [value.get(g) or "" for g in ("Alphabetic", "Ideographic", "Phonetic")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups) or None


def promoted_values(header: Header) -> dict[str, Any]:
    """The typed columns of one instance, plus ``meta``, the pixel data facts and the
    ``warnings`` of values that did not parse (a list of tag/keyword/value/reason)."""
    from dicomlake.catalog.header import parse_da, value_warning

    values: dict[str, Any] = {}
    for name, tag, kind in PROMOTED:
        many = header.values(_PROMOTED_KEYS[tag])
        first = many[0] if many else None
        if kind == "str":
            values[name] = first
        elif kind == "name":
            values[name] = _person_name(first)
        elif kind == "date":
            try:
                values[name] = parse_da(first)
            except ValueError as exc:  # kept as text in meta; NULL here, reported as warning
                values[name] = None
                header.warnings.append(value_warning(tag, str(first), f"{exc}; column "
                                                                      f"{name} is NULL"))
        elif kind == "int":
            values[name] = int(first) if isinstance(first, int | float) else None
        elif kind == "float":
            values[name] = float(first) if isinstance(first, int | float) else None
        else:
            values[name] = (
                [float(v) if isinstance(v, int | float) else None for v in many] if many else None
            )
    values["transfer_syntax_uid"] = header.transfer_syntax_uid
    values["pixel_data_offset"] = header.pixel_data_offset
    values["pixel_data_length"] = header.pixel_data_length
    values["meta"] = header.meta_json()
    values["warnings"] = [w.as_row() for w in header.warnings] or None
    return values
