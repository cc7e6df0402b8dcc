"""Streamed downloads of SQL console results (stub)."""
from __future__ import annotations


def routes() -> list:
    return []
