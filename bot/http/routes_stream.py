"""Placeholder: filled in by the issue-9 work (see app.py)."""

from fastapi import APIRouter

router = APIRouter()
