"""Spark types as Trino types, and Arrow columns as the JSON values Trino clients decode.

Clients build their value decoders from ``typeSignature`` (the Python client indexes
``arguments[0]["value"]`` of every ``varchar``), so each signature is complete: varchar with
its length, decimal with precision and scale, timestamps with precision, and nested
``array``/``map``/``row`` signatures. Values follow Trino's JSON encoding: dates and
timestamps as text, decimals as strings, binary as base64, non-finite doubles as strings.
Top-level columns are converted with Arrow compute (fast path); nested values in Python.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pyspark.sql import types as T

if TYPE_CHECKING:
    import pyarrow as pa

UNBOUNDED_VARCHAR = 2147483647
"""Trino's length argument for ``varchar`` without a declared length."""

TypeSignature = dict[str, Any]


def _long(value: int) -> dict[str, Any]:
    return {"kind": "LONG", "value": value}


def _type(signature: TypeSignature) -> dict[str, Any]:
    return {"kind": "TYPE", "value": signature}


def _sig(raw: str, *arguments: dict[str, Any]) -> TypeSignature:
    return {"rawType": raw, "arguments": list(arguments)}


_SIMPLE: dict[type[T.DataType], str] = {
    T.BooleanType: "boolean",
    T.ByteType: "tinyint",
    T.ShortType: "smallint",
    T.IntegerType: "integer",
    T.LongType: "bigint",
    T.FloatType: "real",
    T.DoubleType: "double",
    T.BinaryType: "varbinary",
    T.DateType: "date",
    T.NullType: "unknown",
    T.VariantType: "json",
}


def trino_type(data_type: T.DataType) -> tuple[str, TypeSignature]:
    """The Trino type name and ``typeSignature`` for a Spark type.

    Spark ``TIMESTAMP`` is an instant shown in the session zone (UTC here), so it maps to
    ``timestamp(6) with time zone``; ``TIMESTAMP_NTZ`` maps to ``timestamp(6)``. Types Trino
    has no twin for (calendar intervals, ``TIME``) are sent as varchar text.
    """
    for spark_type, name in _SIMPLE.items():
        if isinstance(data_type, spark_type):
            return name, _sig(name)
    if isinstance(data_type, T.CharType):
        return f"char({data_type.length})", _sig("char", _long(data_type.length))
    if isinstance(data_type, T.VarcharType):
        return f"varchar({data_type.length})", _sig("varchar", _long(data_type.length))
    if isinstance(data_type, T.StringType):
        return "varchar", _sig("varchar", _long(UNBOUNDED_VARCHAR))
    if isinstance(data_type, T.DecimalType):
        p, s = data_type.precision, data_type.scale
        return f"decimal({p},{s})", _sig("decimal", _long(p), _long(s))
    if isinstance(data_type, T.TimestampNTZType):
        return "timestamp(6)", _sig("timestamp", _long(6))
    if isinstance(data_type, T.TimestampType):
        return "timestamp(6) with time zone", _sig("timestamp with time zone", _long(6))
    if isinstance(data_type, T.DayTimeIntervalType):
        return "interval day to second", _sig("interval day to second")
    if isinstance(data_type, T.YearMonthIntervalType):
        return "interval year to month", _sig("interval year to month")
    if isinstance(data_type, T.ArrayType):
        name, sig = trino_type(data_type.elementType)
        return f"array({name})", _sig("array", _type(sig))
    if isinstance(data_type, T.MapType):
        kname, ksig = trino_type(data_type.keyType)
        vname, vsig = trino_type(data_type.valueType)
        return f"map({kname}, {vname})", _sig("map", _type(ksig), _type(vsig))
    if isinstance(data_type, T.StructType):
        names, args = [], []
        for field in data_type.fields:
            fname, fsig = trino_type(field.dataType)
            names.append(f'"{field.name}" {fname}' if not field.name.isidentifier()
                         else f"{field.name} {fname}")
            args.append({"kind": "NAMED_TYPE",
                         "value": {"fieldName": {"name": field.name}, "typeSignature": fsig}})
        return f"row({', '.join(names)})", _sig("row", *args)
    if isinstance(data_type, T.UserDefinedType):
        return trino_type(data_type.sqlType())
    return "varchar", _sig("varchar", _long(UNBOUNDED_VARCHAR))


def needs_text(data_type: T.DataType) -> bool:
    """True for types Spark cannot hand over as Arrow; the engine casts them to text."""
    if isinstance(data_type, T.ArrayType):
        return needs_text(data_type.elementType)
    if isinstance(data_type, T.MapType):
        return needs_text(data_type.keyType) or needs_text(data_type.valueType)
    if isinstance(data_type, T.StructType):
        return any(needs_text(f.dataType) for f in data_type.fields)
    known = (*_SIMPLE, T.StringType, T.CharType, T.VarcharType, T.DecimalType,
             T.TimestampType, T.TimestampNTZType, T.DayTimeIntervalType)
    return not isinstance(data_type, known) or isinstance(data_type, T.VariantType)


def column_json(name: str, data_type: T.DataType) -> dict[str, Any]:
    """One entry of the response's ``columns`` list."""
    type_name, signature = trino_type(data_type)
    return {"name": name, "type": type_name, "typeSignature": signature}


# ---- values -------------------------------------------------------------------------------

def _interval_day_to_second(value: dt.timedelta) -> str:
    total_ms = round(value.total_seconds() * 1000)
    sign = "-" if total_ms < 0 else ""
    total_ms = abs(total_ms)
    days, rest = divmod(total_ms, 86_400_000)
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{sign}{days} {hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}"


def _double(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def value_json(value: Any) -> Any:
    """A Python value (from Arrow ``to_pylist``) in Trino's JSON encoding, recursively."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _double(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f") + " UTC"
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _interval_day_to_second(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):  # a struct: Trino rows are positional
        return [value_json(v) for v in value.values()]
    if isinstance(value, (list, tuple)):
        return [value_json(v) for v in value]
    return str(value)


def _list(column: pa.Array | pa.ChunkedArray) -> list[Any]:
    return column.to_pylist()


def column_converter(arrow_type: pa.DataType) -> Callable[[pa.Array], list[Any]]:
    """A function turning one Arrow column into a list of JSON-ready values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if (pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type)
            or pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_null(arrow_type)):
        return _list
    if pa.types.is_floating(arrow_type):
        def floats(column: pa.Array) -> list[Any]:
            values = column.to_pylist()
            if column.null_count == len(column) or pc.all(pc.is_finite(column)).as_py():
                return values
            return [None if v is None else _double(v) for v in values]
        return floats
    if pa.types.is_decimal(arrow_type) or pa.types.is_date(arrow_type):
        return lambda column: pc.cast(column, pa.string()).to_pylist()
    if pa.types.is_timestamp(arrow_type):
        suffix = " UTC" if arrow_type.tz is not None else ""

        def stamps(column: pa.Array) -> list[Any]:
            text = pc.strftime(column, format="%Y-%m-%d %H:%M:%S")
            if suffix:
                text = pc.binary_join_element_wise(text, pa.scalar(suffix), "")
            return text.to_pylist()
        return stamps
    convert = _nested_converter(arrow_type)
    return lambda column: [convert(v) for v in column.to_pylist()]


def _nested_converter(arrow_type: pa.DataType) -> Callable[[Any], Any]:
    """Converter for one value of a (possibly nested) Arrow type, driven by the type."""
    import pyarrow as pa

    if pa.types.is_map(arrow_type):
        key, item = _nested_converter(arrow_type.key_type), _nested_converter(arrow_type.item_type)
        return lambda v: None if v is None else {str(key(k)): item(x) for k, x in v}
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        element = _nested_converter(arrow_type.value_type)
        return lambda v: None if v is None else [element(x) for x in v]
    if pa.types.is_struct(arrow_type):
        fields = [(arrow_type.field(i).name, _nested_converter(arrow_type.field(i).type))
                  for i in range(arrow_type.num_fields)]
        return lambda v: None if v is None else [convert(v[name]) for name, convert in fields]
    return value_json


def spark_value_converter(data_type: T.DataType) -> Callable[[Any], Any]:
    """Converter for one value as PySpark's ``collect()`` returns it (maps are dicts,
    structs are ``Row`` tuples), driven by the Spark type."""
    if isinstance(data_type, T.MapType):
        key = spark_value_converter(data_type.keyType)
        item = spark_value_converter(data_type.valueType)
        return lambda v: None if v is None else {str(key(k)): item(x) for k, x in v.items()}
    if isinstance(data_type, T.ArrayType):
        element = spark_value_converter(data_type.elementType)
        return lambda v: None if v is None else [element(x) for x in v]
    if isinstance(data_type, T.StructType):
        fields = [spark_value_converter(f.dataType) for f in data_type.fields]
        return lambda v: None if v is None else [c(x) for c, x in zip(fields, v, strict=True)]
    return value_json
