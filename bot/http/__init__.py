"""The HTTP surface: `gpuherd serve`'s FastAPI app (see app.py)."""
