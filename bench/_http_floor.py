"""The floor under bench_api.py's figures: FastAPI on uvicorn, configured as `gpuherd serve`
configures it, answering the same routes with no gpuherd work behind them.

    python bench/_http_floor.py PORT LIST_FILE BOOT_FILE

`GET /health` answers `{"status": "ok"}`; `GET /api/v1/instances` and `POST /api/v1/instances`
(a JSON body with `template`, a required `Authorization` header) answer the bytes of LIST_FILE
and BOOT_FILE — real answers the bench saved from gpuherd — with 200 and 202. What gpuherd's server adds to a
request is the difference between its figures and these, measured in the same run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Header, Response
from pydantic import BaseModel, ConfigDict


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    template: str
    offer: str | None = None
    overrides: dict[str, str] = {}


def build(listed: bytes, booted: bytes) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/instances")
    async def listing(authorization: Annotated[str, Header()], limit: int = 100) -> Response:
        return Response(listed, media_type="application/json")

    @app.post("/api/v1/instances", status_code=202)
    async def boot(body: Body, authorization: Annotated[str, Header()],
                   idempotency_key: Annotated[str | None, Header()] = None) -> Response:
        return Response(booted, status_code=202, media_type="application/json")

    return app


if __name__ == "__main__":
    port, list_file, boot_file = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    uvicorn.run(build(list_file.read_bytes(), boot_file.read_bytes()), host="127.0.0.1", port=port, log_config=None,
                access_log=False, server_header=False)
