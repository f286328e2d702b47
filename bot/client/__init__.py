"""gpuherd.client: the Python client of `gpuherd serve`'s HTTP API (see api.py).

    from gpuherd.client import Client
    with Client("http://127.0.0.1:8000", os.environ["GPUHERD_API_KEY"]) as gh:
        boot = gh.boot("budget", idempotency_key="cell-7")
"""

from .api import ApiError, AsyncClient, Client, TooManyRequests, error_from, parse_result

__all__ = ["ApiError", "AsyncClient", "Client", "TooManyRequests", "error_from", "parse_result"]
