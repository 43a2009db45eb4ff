"""Trino-protocol SQL service over the lakehouse (issue: SQL service)."""
