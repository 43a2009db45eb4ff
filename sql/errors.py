"""Errors of the SQL service, each carrying the Trino error code a client expects.

Trino clients branch on ``errorType`` (``USER_ERROR`` becomes ``TrinoUserError`` in the Python
client) and on ``errorName`` (SQLAlchemy's dialect treats ``PERMISSION_DENIED`` specially), so
every failure the service reports is one :class:`QueryError` with a code from Trino's own list
(``io.trino.spi.StandardErrorCode``) and, where we know it, the line and column in the SQL the
client sent (never in the translated Spark SQL, which the user has not seen).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dicomlake.errors import DicomlakeError


class ErrorType(StrEnum):
    """Trino's error classes: whose fault it is."""

    USER_ERROR = "USER_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    INSUFFICIENT_RESOURCES = "INSUFFICIENT_RESOURCES"
    EXTERNAL = "EXTERNAL"


@dataclass(frozen=True)
class ErrorCode:
    """One entry of Trino's ``StandardErrorCode``."""

    name: str
    code: int
    type: ErrorType


def _user(name: str, code: int) -> ErrorCode:
    return ErrorCode(name, code, ErrorType.USER_ERROR)


GENERIC_USER_ERROR = _user("GENERIC_USER_ERROR", 0)
SYNTAX_ERROR = _user("SYNTAX_ERROR", 1)
ABANDONED_QUERY = _user("ABANDONED_QUERY", 2)
USER_CANCELED = _user("USER_CANCELED", 3)
PERMISSION_DENIED = _user("PERMISSION_DENIED", 4)
NOT_FOUND = _user("NOT_FOUND", 5)
FUNCTION_NOT_FOUND = _user("FUNCTION_NOT_FOUND", 6)
DIVISION_BY_ZERO = _user("DIVISION_BY_ZERO", 8)
INVALID_CAST_ARGUMENT = _user("INVALID_CAST_ARGUMENT", 9)
NOT_SUPPORTED = _user("NOT_SUPPORTED", 13)
INVALID_SESSION_PROPERTY = _user("INVALID_SESSION_PROPERTY", 14)
NUMERIC_VALUE_OUT_OF_RANGE = _user("NUMERIC_VALUE_OUT_OF_RANGE", 19)
READ_ONLY_VIOLATION = _user("READ_ONLY_VIOLATION", 23)
QUERY_TEXT_TOO_LARGE = _user("QUERY_TEXT_TOO_LARGE", 35)
CATALOG_NOT_FOUND = _user("CATALOG_NOT_FOUND", 44)
SCHEMA_NOT_FOUND = _user("SCHEMA_NOT_FOUND", 45)
TABLE_NOT_FOUND = _user("TABLE_NOT_FOUND", 46)
COLUMN_NOT_FOUND = _user("COLUMN_NOT_FOUND", 47)
TABLE_ALREADY_EXISTS = _user("TABLE_ALREADY_EXISTS", 50)
MISSING_SCHEMA_NAME = _user("MISSING_SCHEMA_NAME", 57)
TYPE_MISMATCH = _user("TYPE_MISMATCH", 58)
INVALID_PARAMETER_USAGE = _user("INVALID_PARAMETER_USAGE", 80)
GENERIC_INTERNAL_ERROR = ErrorCode("GENERIC_INTERNAL_ERROR", 65536, ErrorType.INTERNAL_ERROR)
SERVER_SHUTTING_DOWN = ErrorCode("SERVER_SHUTTING_DOWN", 65545, ErrorType.INTERNAL_ERROR)
GENERIC_INSUFFICIENT_RESOURCES = ErrorCode("GENERIC_INSUFFICIENT_RESOURCES", 131072,
                                           ErrorType.INSUFFICIENT_RESOURCES)
EXCEEDED_TIME_LIMIT = ErrorCode("EXCEEDED_TIME_LIMIT", 131075, ErrorType.INSUFFICIENT_RESOURCES)


class SqlServiceError(DicomlakeError):
    """Base of the SQL service's own errors."""


class QueryError(SqlServiceError):
    """A statement failed; becomes the ``error`` object of the Trino response.

    ``line`` and ``column`` are 1-based positions in the statement text the client sent.
    ``params`` and ``fragment`` keep what the engine said about a failure (Spark's message
    parameters, the piece of the *translated* SQL it blamed) until the error is put in the
    client's terms (:func:`dicomlake.sql.translate.client_error`); clients never see them.
    """

    def __init__(self, code: ErrorCode, message: str, *, line: int | None = None,
                 column: int | None = None, params: dict[str, str] | None = None,
                 fragment: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.line = line
        self.column = column
        self.params: dict[str, str] = params or {}
        self.fragment = fragment

    def at(self, line: int | None, column: int | None) -> QueryError:
        """This error located at ``line:column`` of the client's text, its message starting
        ``line L:C: `` as Trino's analysis errors do (no-op without a line)."""
        if line is None:
            return self
        self.line, self.column = line, column or 1
        if not self.message.startswith("line "):
            self.message = f"line {line}:{self.column}: {self.message}"
            self.args = (self.message,)
        return self

    def to_json(self) -> dict[str, object]:
        """The Trino ``QueryError`` document."""
        doc: dict[str, object] = {
            "message": self.message,
            "errorCode": self.code.code,
            "errorName": self.code.name,
            "errorType": self.code.type.value,
            "failureInfo": {"type": self.code.name, "message": self.message, "suppressed": [],
                            "stack": []},
        }
        if self.line is not None:
            location = {"lineNumber": self.line, "columnNumber": self.column or 1}
            doc["errorLocation"] = location
            doc["failureInfo"]["errorLocation"] = location  # type: ignore[index]
        return doc


class AuthenticationError(SqlServiceError):
    """Credentials are missing or wrong (HTTP 401); the message never says which part."""


class UserStoreError(SqlServiceError):
    """The users file cannot be read or a user command cannot be done (names the fix)."""
