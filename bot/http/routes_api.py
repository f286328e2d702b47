"""The REST API under `/api/v1` (SPEC §8, §10): offers, templates, instances, confirmations;
routes_admin.py adds costs, statistics, budgets, audit, users and keys (included here, so
app.py includes one router).

A thin surface: each route bounds its input (schemas.py), calls one `GpuService` method with
the caller's `Actor` and answers core's result model as JSON. Who may do what is core's
(PermissionDenied -> 403); bad input core finds is its InvalidInput (-> 400, core's message);
a body or parameter that does not validate is a 422 naming the field (app.py).

Decisions:

- Status codes. Long work that goes on after the answer is `202 Accepted`: a boot (its
  `BootResult` carries `operation_id` and the instance; follow it on `GET /api/v1/events`) and a
  start. When core asks for a yes instead (a price above the template's limit, a budget used up,
  a destroy), the answer is `200` with core's `Confirmation`: nothing started, the question is
  the result. `POST /confirmations/{token}` answers `202` when the yes started a boot, else `200`.
  Everything else is `200` (a created API key `201`). A replayed boot (the same
  `Idempotency-Key`) answers the first boot's result with `202` again and `replayed: true`.
- `Idempotency-Key` is passed to core for boot, start, stop and destroy; core scopes a key to
  one actor, one operation and one request (the same key twice boots one machine; another
  request with it is a 409). Keys are 1–200 characters of `[A-Za-z0-9._:-]`.
- `POST /instances/{id}/destroy` without `confirmed=true` answers core's Confirmation (accept
  it with `POST /confirmations/{token}`); `confirmed=true` destroys at once — core allows it for
  anyone who may destroy that instance, as chat's `/gpu destroy <id> --yes` does.
- Search: the structured filters (`gpu`, `min_gpu_ram`, `max_dph`, `num_gpus`, `provider`) are
  written as clauses of core's query language and appended to `q`, so there is one grammar and
  one parser; the patterns on `gpu` and `provider` keep a filter from injecting other clauses.
- `GET /instances` refreshes the page's states from the providers by default, as `/gpu status`
  does; `refresh=false` reads the database only (dashboards polling often)."""

from __future__ import annotations

from collections import OrderedDict
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from gpuherd.core.results import (
    ActivityResult,
    BootResult,
    Cancelled,
    Confirmation,
    DestroyResult,
    InstanceCost,
    InstanceView,
    KeepResult,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateDetail,
    TemplateList,
    UserView,
)

from . import routes_admin
from .auth import CurrentActor, get_service
from .problems import RESPONSES
from .schemas import (
    GPU_PATTERN,
    MAX_CURSOR,
    MAX_KEY,
    MAX_QUERY,
    PROVIDER_PATTERN,
    TOKEN_PATTERN,
    ActivityBody,
    BootBody,
    KeepBody,
)

router = APIRouter()

KEY_PATTERN = rf"^[A-Za-z0-9._:\-]{{1,{MAX_KEY}}}$"
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=KEY_PATTERN, max_length=MAX_KEY,
    description="the same key for a retried request: the work is done once and its first answer repeated")]
InstanceId = Annotated[str, Path(min_length=1, max_length=32, description="an instance id, e.g. g-7f3a")]
Cursor = Annotated[str | None, Query(max_length=MAX_CURSOR, description="`next_cursor` of the previous page")]
CONFIRMATION_200 = {"model": Confirmation, "description": "core asks for a yes first: nothing started; accept "
                                                          "with `POST /api/v1/confirmations/{token}`"}


def _json(result: BaseModel, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    """A result with a status other than the route's default (money stays decimal strings)."""
    return JSONResponse(result.model_dump(mode="json"), status_code=status, headers=headers)


def _location(instance_id: str) -> dict[str, str]:
    return {"Location": f"/api/v1/instances/{instance_id}"}


def _decimal(value: Decimal) -> str:
    return format(value.normalize(), "f")


def search_text(q: str, *, gpu: str | None = None, min_gpu_ram: Decimal | None = None,
                max_dph: Decimal | None = None, num_gpus: int | None = None, provider: str | None = None) -> str:
    """`q` with the structured filters appended as query-language clauses (core parses all)."""
    parts = [q.strip()] if q.strip() else []
    if gpu:
        parts.append(f"gpu={gpu}")
    if min_gpu_ram is not None:
        parts.append(f"gpu_ram>={_decimal(min_gpu_ram)}")
    if max_dph is not None:
        parts.append(f"dph<={_decimal(max_dph)}")
    if num_gpus is not None:
        parts.append(f"num_gpus={num_gpus}")
    if provider:
        parts.append(f"provider={provider}")
    return " ".join(parts)


# --- offers and templates -----------------------------------------------------------------------

@router.get("/offers", response_model=SearchResult, responses=RESPONSES, tags=["offers"],
            summary="Search live offers of every provider, cheapest first")
async def search_offers(
        request: Request, actor: CurrentActor,
        q: Annotated[str, Query(max_length=MAX_QUERY, description="the search query language, e.g. "
                                                                   "`4090 gpu_ram>=24 <$0.5 -o -reliability`")] = "",
        gpu: Annotated[str | None, Query(pattern=GPU_PATTERN, description="GPU model word or name "
                                                                          "(`4090`, `A100_80GB`)")] = None,
        min_gpu_ram: Annotated[Decimal | None, Query(ge=0, le=10_000, max_digits=8, decimal_places=2,
                                                     description="GB per GPU, at least")] = None,
        max_dph: Annotated[Decimal | None, Query(ge=0, le=10_000, max_digits=10, decimal_places=6,
                                                 description="USD per hour, at most")] = None,
        num_gpus: Annotated[int | None, Query(ge=1, le=64)] = None,
        provider: Annotated[str | None, Query(pattern=PROVIDER_PATTERN, description="only this provider")] = None,
        limit: Annotated[int | None, Query(ge=1, le=1000, description="offers a page (default 10)")] = None,
        cursor: Cursor = None) -> SearchResult:
    """The same query language as `/gpu search`; the structured filters are added to `q`."""
    text = search_text(q, gpu=gpu, min_gpu_ram=min_gpu_ram, max_dph=max_dph, num_gpus=num_gpus, provider=provider)
    return await get_service(request).search(actor, text, limit=limit, cursor=cursor)


@router.get("/me", response_model=UserView, responses=RESPONSES, tags=["administration"],
            summary="Who this API key is: principal, role and team")
async def whoami(request: Request, actor: CurrentActor) -> UserView:
    return await get_service(request).whoami(actor)


@router.get("/templates", response_model=TemplateList, responses=RESPONSES, tags=["templates"],
            summary="Every template, built-in and the team's")
async def list_templates(request: Request, actor: CurrentActor) -> TemplateList:
    return await get_service(request).list_templates(actor)


@router.get("/templates/{name}", response_model=TemplateDetail, responses=RESPONSES, tags=["templates"],
            summary="One template in full, with the overrides it takes")
async def show_template(request: Request, actor: CurrentActor,
                        name: Annotated[str, Path(min_length=1, max_length=64, examples=["budget"])],
                        ) -> TemplateDetail:
    return await get_service(request).show_template(actor, name)


# --- instances -------------------------------------------------------------------------------

@router.post("/instances", status_code=202, response_model=BootResult, tags=["instances"],
             responses={**RESPONSES, 200: CONFIRMATION_200},
             summary="Boot an instance from a template (202 once the order is written)")
async def boot(request: Request, body: BootBody, actor: CurrentActor, response: Response,
               idempotency_key: IdempotencyKey = None) -> Any:
    """Answers once the checks passed and the order (the intent and its operation) is written:
    the instance is `pending` and the provider call goes on in the server, so a slow cloud does
    not hold the client. Everything after — the provider accepting the machine or refusing it,
    loading, healthy — follows on the event stream (`operation_id`). The same `Idempotency-Key`
    again answers the first boot."""
    result = await get_service(request).boot(actor, body.template, offer=body.offer, provider=body.provider,
                                             overrides=dict(body.overrides), idempotency_key=idempotency_key,
                                             detach=True)
    if isinstance(result, Confirmation):
        return _json(result, 200)
    response.headers.update(_location(result.instance.id))
    return result


@router.get("/instances", response_model=StatusResult, responses=RESPONSES, tags=["instances"],
            summary="Instances, newest first, one page")
async def list_instances(request: Request, actor: CurrentActor,
                         limit: Annotated[int, Query(ge=1, le=500)] = 100, cursor: Cursor = None,
                         include_ended: Annotated[bool, Query(description="destroyed and failed too")] = False,
                         refresh: Annotated[bool, Query(description="ask the providers for the page's "
                                                                    "states first")] = True,
                         mine: Annotated[bool, Query(description="only the caller's own machines (and their "
                                                                 "run-rate)")] = False) -> Any:
    """Shared (core's `status(share=True)`): a page polled by many of one person's clients at
    once is built once a second; its JSON is rendered once per page built."""
    result = await get_service(request).status(actor, include_ended=include_ended, refresh=refresh, limit=limit,
                                               cursor=cursor, share=True, mine=mine)
    return Response(_rendered(result), media_type="application/json")


_RENDERED: OrderedDict[int, tuple[BaseModel, bytes]] = OrderedDict()


def _rendered(result: BaseModel) -> bytes:
    """The JSON of a result, remembered by identity for the last pages answered (the entry
    holds the result, so its id cannot be reused while remembered)."""
    hit = _RENDERED.get(id(result))
    if hit is not None and hit[0] is result:
        return hit[1]
    body = result.model_dump_json().encode()
    _RENDERED[id(result)] = (result, body)
    while len(_RENDERED) > 64:
        _RENDERED.popitem(last=False)
    return body


@router.get("/instances/{instance_id}", response_model=InstanceView, responses=RESPONSES, tags=["instances"],
            summary="One instance as gpuherd has it now")
async def get_instance(request: Request, actor: CurrentActor, instance_id: InstanceId) -> InstanceView:
    return await get_service(request).view(actor, instance_id)


@router.post("/instances/{instance_id}/start", status_code=202, response_model=StartResult, responses=RESPONSES,
             tags=["instances"], summary="Resume a stopped instance (202 once the provider accepted)")
async def start(request: Request, actor: CurrentActor, instance_id: InstanceId,
                idempotency_key: IdempotencyKey = None) -> StartResult:
    return await get_service(request).start(actor, instance_id, idempotency_key=idempotency_key)


@router.post("/instances/{instance_id}/stop", response_model=StopResult, responses=RESPONSES, tags=["instances"],
             summary="Stop an instance (its disk is kept and still billed)")
async def stop(request: Request, actor: CurrentActor, instance_id: InstanceId,
               idempotency_key: IdempotencyKey = None) -> StopResult:
    return await get_service(request).stop(actor, instance_id, idempotency_key=idempotency_key)


@router.post("/instances/{instance_id}/destroy", response_model=DestroyResult | Confirmation, responses=RESPONSES,
             tags=["instances"], summary="Destroy an instance (asks first unless confirmed=true)")
async def destroy(request: Request, actor: CurrentActor, instance_id: InstanceId,
                  confirmed: Annotated[bool, Query(description="destroy now instead of answering a "
                                                               "Confirmation")] = False,
                  idempotency_key: IdempotencyKey = None) -> DestroyResult | Confirmation:
    return await get_service(request).destroy(actor, instance_id, confirmed=confirmed,
                                              idempotency_key=idempotency_key)


@router.post("/instances/{instance_id}/keep", response_model=KeepResult, responses=RESPONSES, tags=["instances"],
             summary="Postpone idle shutdown")
async def keep(request: Request, actor: CurrentActor, instance_id: InstanceId,
               body: KeepBody | None = None) -> KeepResult:
    return await get_service(request).keep(actor, instance_id, body.duration if body else None)


@router.post("/instances/{instance_id}/activity", response_model=ActivityResult, responses=RESPONSES,
             tags=["instances"], summary="Report use (a model gateway, a notebook): the idle clock restarts")
async def activity(request: Request, actor: CurrentActor, instance_id: InstanceId,
                   body: ActivityBody | None = None) -> ActivityResult:
    body = body or ActivityBody()
    return await get_service(request).record_activity(actor, instance_id, body.source, body.detail)


@router.get("/instances/{instance_id}/cost", response_model=InstanceCost, responses=RESPONSES, tags=["instances"],
            summary="One instance's cost analysis")
async def instance_cost(request: Request, actor: CurrentActor, instance_id: InstanceId) -> InstanceCost:
    return await get_service(request).instance_cost(actor, instance_id)


# --- confirmations -----------------------------------------------------------------------------

Token = Annotated[str, Path(pattern=TOKEN_PATTERN, description="the `token` of a Confirmation")]


@router.post("/confirmations/{token}", response_model=DestroyResult | Confirmation, tags=["confirmations"],
             responses={**RESPONSES, 202: {"model": BootResult, "description": "the yes started a boot"}},
             summary="Say yes to a stored question")
async def confirm(request: Request, actor: CurrentActor, token: Token) -> Any:
    """The price and the budget are checked again: a price that rose asks again (200 with a new
    Confirmation). The same yes twice does the work once."""
    result = await get_service(request).confirm(actor, token)
    if isinstance(result, BootResult):
        return _json(result, 202, _location(result.instance.id))
    return result


@router.delete("/confirmations/{token}", response_model=Cancelled, responses=RESPONSES, tags=["confirmations"],
               summary="Say no to a stored question")
async def cancel(request: Request, actor: CurrentActor, token: Token) -> Cancelled:
    return await get_service(request).cancel(actor, token)


router.include_router(routes_admin.router)
