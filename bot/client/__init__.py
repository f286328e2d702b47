"""gpuherd.client: the Python client of `gpuherd serve`'s HTTP API (see api.py)."""
