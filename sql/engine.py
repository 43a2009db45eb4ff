"""The engine behind the endpoint: one Spark session per role, statements run in job groups.

Each statement runs in its user's role session (:mod:`.roles`); non-admin statements are
parsed, checked and analysed there by :meth:`RoleSession.dataframe`.

Each running query owns a Spark job group, so cancelling it (client ``DELETE``, timeout,
shutdown) is ``cancelJobGroup``: Spark kills its tasks (``interruptOnCancel``), the Python
workers reading Delta files are stopped, and the result iterator fails at once.

Results stream partition by partition as Arrow batches (``toArrowBatchRdd`` served through
Spark's local-iterator socket): the driver holds one partition, not the whole result, and
converting Arrow columns is ~10x faster than Spark's row-by-row ``toLocalIterator``.

Over Spark Connect (``sc://``) there is no SparkContext in this process: a query is tagged
(``addTag``) and cancelled with ``interruptTag``, results arrive as the server's Arrow batches
(``toArrow``, at most ``row_limit + 1`` rows), and Spark job statuses are not reported.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyspark.sql import types as T

from dicomlake.sql import errors as E
from dicomlake.sql.errors import QueryError
from dicomlake.sql.types import needs_text

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

    from dicomlake.sql.roles import RoleSessions
    from dicomlake.sql.users import Role

_INTERNAL_NAMES = re.compile(
    r"`?__dl_rel__(\w+?)__(\w+)`?|`?__dl_md__(\w+)`?")

_SPARK_ERRORS: dict[str, E.ErrorCode] = {
    "TABLE_OR_VIEW_NOT_FOUND": E.TABLE_NOT_FOUND,
    "UNRESOLVED_COLUMN": E.COLUMN_NOT_FOUND,
    "UNRESOLVED_FIELD": E.COLUMN_NOT_FOUND,
    "UNRESOLVED_ROUTINE": E.FUNCTION_NOT_FOUND,
    "SCHEMA_NOT_FOUND": E.SCHEMA_NOT_FOUND,
    "PARSE_SYNTAX_ERROR": E.SYNTAX_ERROR,
    "DIVIDE_BY_ZERO": E.DIVISION_BY_ZERO,
    "ARITHMETIC_OVERFLOW": E.NUMERIC_VALUE_OUT_OF_RANGE,
    "NUMERIC_VALUE_OUT_OF_RANGE": E.NUMERIC_VALUE_OUT_OF_RANGE,
    "CAST_INVALID_INPUT": E.INVALID_CAST_ARGUMENT,
    "DATATYPE_MISMATCH": E.TYPE_MISMATCH,
    "TABLE_OR_VIEW_ALREADY_EXISTS": E.TABLE_ALREADY_EXISTS,
    "USER_RAISED_EXCEPTION": E.GENERIC_USER_ERROR,
}


class _AsDebug(logging.Filter):
    """Turns a record into a DEBUG record (handlers then drop it unless DEBUG is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


@dataclass
class ResultStream:
    """Columns of a result and either its Arrow batches or (small local results) its rows."""

    columns: list[tuple[str, T.DataType]]
    batches: Iterator[pa.RecordBatch]
    rows: list[tuple[Any, ...]] | None = None


def _has_timestamp(data_type: T.DataType) -> bool:
    if isinstance(data_type, (T.TimestampType, T.TimestampNTZType)):
        return True
    if isinstance(data_type, T.ArrayType):
        return _has_timestamp(data_type.elementType)
    if isinstance(data_type, T.MapType):
        return _has_timestamp(data_type.keyType) or _has_timestamp(data_type.valueType)
    if isinstance(data_type, T.StructType):
        return any(_has_timestamp(f.dataType) for f in data_type.fields)
    return False


def public_message(message: str) -> str:
    """An engine message with internal view names replaced by the names the user wrote."""
    def name(m: re.Match[str]) -> str:
        if m.group(1):
            return f"{m.group(1)}.{m.group(2)}"
        return f"metadata.{m.group(3)}"

    first = message.strip().split("\n", 1)[0]
    first = re.sub(r";?\s*line \d+ pos \d+;?", "", first)
    first = re.sub(r"\s*SQLSTATE: \w+\.?", "", first)
    first = re.sub(r"^\[[A-Z_]+(?:\.[A-Z_]+)*\]\s*", "", first)
    first = " ".join(s for s in re.split(r"(?<=\.)\s+", first)
                     if not s.startswith(_SPARK_ADVICE))
    first = _INTERNAL_NAMES.sub(name, first).replace("`", "")
    return first.strip()


_SPARK_ADVICE = ("Did you mean", "Use `try_", "Use 'try_", "If necessary set", "Verify the ",
                 "To tolerate", "Correct the value")
"""Sentences of Spark messages that advise Spark functions, settings or internal names."""


_PYTHON_RAISE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)


def _python_worker_reason(text: str) -> tuple[str, str] | None:
    """(exception class, message) of the last error a Python UDF/UDTF raised, if any.

    Spark's own first line is only "An exception was thrown from the Python worker"; the
    reason a user can act on (e.g. image_knn's "unknown SOPInstanceUID") is the traceback's
    last ``Class: message`` line.
    """
    if "thrown from the Python worker" not in text:
        return None
    found = _PYTHON_RAISE.findall(text)
    return found[-1] if found else None


def query_error(exc: BaseException) -> QueryError:
    """A Spark failure as a Trino error (user errors for analysis problems)."""
    from py4j.protocol import Py4JJavaError

    condition, params, fragment = _spark_details(exc)
    text = str(exc)
    if isinstance(exc, Py4JJavaError):  # raised by a direct JVM call: the JVM's own message
        text = str(exc.java_exception.getMessage() or exc.java_exception.toString())
    base = condition.split(".", 1)[0]
    code = _SPARK_ERRORS.get(base)
    message = public_message(text)
    reason = _python_worker_reason(text)
    if reason is not None:
        raiser, message = reason[0], public_message(reason[1])
        # The project's own errors (bad k, unknown id, no codebook) are the user's to fix.
        code = code or (E.GENERIC_USER_ERROR if raiser.startswith("dicomlake.")
                        or raiser in ("ValueError", "KeyError") else None)
    if code is None:
        from pyspark.errors import AnalysisException, ParseException

        java = exc.java_exception.getClass().getName() if isinstance(exc, Py4JJavaError) else ""
        if isinstance(exc, (AnalysisException, ParseException)) or java.endswith(
                ("AnalysisException", "ParseException")):
            code = (E.SYNTAX_ERROR if java.endswith("ParseException")
                    else _SPARK_ERRORS.get(_condition_of(text), E.GENERIC_USER_ERROR))
        elif "ArithmeticException" in text or "SparkArithmeticException" in text:
            code = E.GENERIC_USER_ERROR
        else:
            code = E.GENERIC_INTERNAL_ERROR
    return QueryError(code, message, params=params, fragment=fragment)


def _spark_details(exc: BaseException) -> tuple[str, dict[str, str], str | None]:
    """Spark's error class, message parameters and the fragment of SQL it blamed, from a
    PySpark exception or a JVM exception raised by a direct call (guarded sessions)."""
    from py4j.protocol import Py4JError, Py4JJavaError
    from pyspark.errors import PySparkException

    if isinstance(exc, PySparkException):
        contexts = exc.getQueryContext() or []
        fragments = [c.fragment() for c in contexts if c.contextType().name == "SQL"]
        return (exc.getCondition() or "", dict(exc.getMessageParameters() or {}),
                fragments[0] if fragments else None)
    if isinstance(exc, Py4JJavaError):
        java = exc.java_exception
        try:
            condition = str(java.getCondition() or "")
            params = {str(k): str(v) for k, v in dict(java.getMessageParameters()).items()}
            contexts = list(java.getQueryContext() or [])
        except Py4JError:  # not a SparkThrowable
            return "", {}, None
        return condition, params, str(contexts[0].fragment()) if contexts else None
    return "", {}, None


SMALL_RESULT = 10_000
"""Results up to this many rows are collected in one job; larger ones are streamed."""


def _condition_of(text: str) -> str:
    """The error class of a Spark message such as ``[TABLE_OR_VIEW_NOT_FOUND] ...``."""
    match = re.match(r"\s*\[([A-Z_]+)(?:\.[A-Z_]+)?\]", text)
    return match.group(1) if match else ""


class SparkEngine:
    """Runs Spark SQL for the service, each statement in its role's session."""

    def __init__(self, sessions: RoleSessions) -> None:
        from dicomlake.session import is_connect

        self.sessions = sessions
        self.spark = sessions.admin()
        self.connect = is_connect(self.spark)
        self._quiet_failure_logs()

    def _quiet_failure_logs(self) -> None:
        """A failed statement is the service's to log, as one line (:mod:`.query`); Spark's
        own reports of it go to DEBUG or nowhere.

        PySpark logs every SQL error it converts, stack included, at ERROR through its own
        JSON loggers (``SQLQueryContextLogger``...) straight to stderr; they are demoted to
        DEBUG records of the ordinary logging tree. The driver JVM's executor and task
        scheduler log each failed task with its Java stack; the same stack reaches the
        service in the exception and is logged at DEBUG there.
        """
        from pyspark.logger import PySparkLogger

        for name in ("SQLQueryContextLogger", "DataFrameQueryContextLogger"):
            logger = PySparkLogger.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
            if not any(isinstance(f, _AsDebug) for f in logger.filters):
                logger.addFilter(_AsDebug())
        if self.connect:
            return
        jvm = self.spark.sparkContext._jvm
        assert jvm is not None
        level = jvm.org.apache.logging.log4j.Level.OFF
        for name in ("org.apache.spark.executor.Executor",
                     "org.apache.spark.scheduler.TaskSetManager"):
            jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(name, level)

    def _arrow_ready(self, df: DataFrame) -> DataFrame:
        from pyspark.sql import functions as F

        if not any(needs_text(f.dataType) for f in df.schema.fields):
            return df
        return df.select(*[
            F.col(f"`{f.name}`").cast("string").alias(f.name) if needs_text(f.dataType)
            else F.col(f"`{f.name}`") for f in df.schema.fields])

    def execute(self, sql: str, *, role: Role, group: str, description: str, is_query: bool,
                row_limit: int | None, rename: dict[str, str] | None = None,
                output: list[str] | None = None) -> ResultStream:
        """Start a statement in job group ``group`` of ``role``'s session and return its
        result stream.

        ``output`` says how the client's select list names the result (see
        :func:`~dicomlake.sql.translate.trino_names`); Spark's names for unnamed columns
        (``count(1)``, ``current_timestamp()``) become Trino's ``_colN``.

        ``row_limit`` makes Spark stop after that many rows (+1, so the caller can tell the
        result was cut), which keeps a runaway ``SELECT *`` from computing everything.
        """
        if self.connect:
            self.spark.addTag(group)
        else:
            self.spark.sparkContext.setJobGroup(group, description[:200],
                                                interruptOnCancel=True)
        df = self._named(self.sessions.get(role).dataframe(sql), output)
        if rename and any(old in df.columns for old in rename):
            df = df.withColumnsRenamed({old: new for old, new in rename.items()
                                        if old in df.columns})
        df = self._arrow_ready(df)
        columns = [(f.name, f.dataType) for f in df.schema.fields]
        if not columns:
            return ResultStream([], iter(()))
        if not is_query:
            if self._is_local(df) and not any(_has_timestamp(t) for _, t in columns):
                return ResultStream(columns, iter(()), rows=[tuple(r) for r in df.collect()])
            return ResultStream(columns, self._batches(df))
        # Every DataFrame step re-analyses the plan (milliseconds each through py4j), so the
        # common case is one limited DataFrame, checked and collected as it is: a result of
        # at most SMALL_RESULT rows costs what a direct collect() costs, where the streaming
        # iterator runs one job per partition. Only a result that does not fit is streamed
        # (the query runs again, stopped after row_limit + 1 rows).
        head = df.limit(SMALL_RESULT + 1)
        if self._is_local(head) and not any(_has_timestamp(t) for _, t in columns):
            # Constant and metadata results: Spark answers these without a job.
            rows = [tuple(r) for r in head.collect()]
            if len(rows) <= SMALL_RESULT:
                return ResultStream(columns, iter(()), rows=rows)
        else:
            table = head.toArrow()
            if table.num_rows <= SMALL_RESULT:
                return ResultStream(columns, iter(table.to_batches()))
        limited = df if row_limit is None else df.limit(row_limit + 1)
        return ResultStream(columns, self._batches(limited))

    @staticmethod
    def _named(df: DataFrame, output: list[str] | None) -> DataFrame:
        from dicomlake.sql.translate import trino_names

        names = trino_names(df.columns, output)
        return df if names == df.columns else df.toDF(*names)

    def _is_local(self, df: DataFrame) -> bool:
        """Answered without a Spark job? (Unknown over Connect, which shows no plan object.)"""
        if self.connect:
            return False
        plan = df._jdf.queryExecution().optimizedPlan()
        return str(plan.getClass().getSimpleName()) in ("LocalRelation", "OneRowRelation")

    def _batches(self, df: DataFrame) -> Iterator[pa.RecordBatch]:
        import pyarrow as pa
        from pyspark.serializers import NoOpSerializer
        from pyspark.sql.pandas.types import to_arrow_schema
        from pyspark.util import _local_iterator_from_socket

        if self.connect:
            yield from df.toArrow().to_batches()
            return
        timezone = self.spark.conf.get("spark.sql.session.timeZone") or "UTC"
        schema = to_arrow_schema(df.schema, timezone=timezone)
        jvm = self.spark.sparkContext._jvm
        assert jvm is not None
        rdd = df._jdf.toArrowBatchRdd()
        sock_info = jvm.PythonRDD.toLocalIteratorAndServe(rdd, True)
        for payload in _local_iterator_from_socket(sock_info, NoOpSerializer()):
            yield pa.ipc.read_record_batch(pa.py_buffer(payload), schema)

    def output_columns(self, sql: str, role: Role,
                       output: list[str] | None = None) -> list[tuple[str, T.DataType]]:
        """Columns a query would return (analysis only, no job), named as :meth:`execute`
        names them."""
        df = self._named(self.sessions.get(role).dataframe(sql), output)
        return [(f.name, f.dataType) for f in df.schema.fields]

    def job_statuses(self, group: str) -> list[str]:
        """Statuses (RUNNING, SUCCEEDED, FAILED, ...) of the Spark jobs of a job group (none
        over Connect, whose client sees no status tracker)."""
        if self.connect:
            return []
        tracker = self.spark.sparkContext.statusTracker()
        statuses = []
        for job_id in tracker.getJobIdsForGroup(group):
            info = tracker.getJobInfo(job_id)
            if info is not None:
                statuses.append(str(info.status))
        return statuses

    def cancel(self, group: str) -> None:
        """Cancel every job of a job group (safe if it has none)."""
        if self.connect:
            self.spark.interruptTag(group)
        else:
            self.spark.sparkContext.cancelJobGroup(group)

    def clear_group(self) -> None:
        """Forget this thread's job group so later work is not cancelled with it."""
        if self.connect:
            self.spark.clearTags()
            return
        self.spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
        self.spark.sparkContext.setLocalProperty("spark.job.description", None)
        self.spark.sparkContext.setLocalProperty("spark.job.interruptOnCancel", None)


def engine_error_or_cancel(exc: BaseException, cancelled: QueryError | None) -> QueryError:
    """The error to report: the cancel reason if the query was cancelled, else the failure."""
    if cancelled is not None:
        return cancelled
    if isinstance(exc, QueryError):
        return exc
    return query_error(exc)
