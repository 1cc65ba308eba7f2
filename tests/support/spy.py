"""Watching calls without changing them."""

from __future__ import annotations

import pytest


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[tuple]:
    """The arguments of every call of ``owner.name`` from now on (which still does its work)."""
    plain, calls = getattr(owner, name), []

    def counted(*args):
        calls.append(args)
        return plain(*args)

    monkeypatch.setattr(owner, name, counted)
    return calls
