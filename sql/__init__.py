"""Trino-protocol SQL service over the lakehouse: ``dicomlake serve``.

Layers, outermost first: :mod:`~dicomlake.sql.server` (HTTP resource, auth, TLS),
:mod:`~dicomlake.sql.query` (query lifecycle and limits), :mod:`~dicomlake.sql.translate`
(Trino SQL to a plan), :mod:`~dicomlake.sql.engine` (Spark). Beside them: users and roles
(:mod:`~dicomlake.sql.users`), masking for analysts, the audit log, type mapping.
"""

from __future__ import annotations

from dicomlake.sql.errors import QueryError, SqlServiceError
from dicomlake.sql.users import Role, UserStore

__all__ = ["QueryError", "Role", "SqlServiceError", "UserStore"]
