"""Trino-protocol SQL service over the lakehouse: ``dicomlake serve``.

Layers, outermost first: :mod:`~dicomlake.sql.server` (HTTP resource, auth, TLS),
:mod:`~dicomlake.sql.query` (query lifecycle and limits), :mod:`~dicomlake.sql.translate`
(Trino SQL to a plan), :mod:`~dicomlake.sql.engine` (Spark). Beside them: users
(:mod:`~dicomlake.sql.users`), one Spark session per role (:mod:`~dicomlake.sql.roles`) whose
statements are judged on Spark's plans (:mod:`~dicomlake.sql.guard`), the audit log, type
mapping. Analysts read the stored de-identified tables of :mod:`dicomlake.catalog.deid`.
"""

from __future__ import annotations

from dicomlake.sql.errors import QueryError, SqlServiceError
from dicomlake.sql.users import Role, UserStore

__all__ = ["QueryError", "Role", "SqlServiceError", "UserStore"]
