"""Placeholder: `/metrics` and request latency (see app.py)."""

from fastapi import APIRouter

router = APIRouter()


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Record one request's latency by route (filled in with prometheus-client)."""
