"""The money and administration part of `/api/v1`: costs, statistics, budgets, audit, users and
API keys (included by routes_api.router). The same thin pattern as routes_api.py: bounded
input, one `GpuService` call with the caller's `Actor`, core's result model out; core decides
who may (budgets, audit, users and keys are for admins; costs and statistics for viewers up).

Decisions:

- `POST /keys` answers `201` with core's `CreatedKey`: the only response that ever holds a key
  in clear, sent with `Cache-Control: no-store` so no proxy or browser keeps it. Listing and
  revoking show `KeyView`s (ids, never keys).
- A budget amount is a JSON number or a decimal string, read as `Decimal` (never a float) and
  checked by core (whole cents, more than $0, a plausible size)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from gpuherd.core.results import AuditResult, BudgetResult, BudgetScope, CostReport, CreatedKey, GroupBy, KeyView, UserView
from gpuherd.core.statistics import StatisticsResult

from .auth import CurrentActor, get_service
from .problems import RESPONSES
from .schemas import MAX_CURSOR, NO_CONTROL, PRINCIPAL_PATTERN, BudgetBody, KeyBody, UserBody

router = APIRouter()

BudgetName = Annotated[str, Path(min_length=1, max_length=128, pattern=NO_CONTROL,
                                 description="the team or the user (principal)")]
Principal = Annotated[str, Path(pattern=PRINCIPAL_PATTERN, description="e.g. slack:U2, api:alice")]


@router.get("/costs", response_model=CostReport, responses=RESPONSES, tags=["money"],
            summary="Spend in a period by group, what bills now, budgets, projection")
async def costs(request: Request, actor: CurrentActor,
                period: Annotated[str | None, Query(max_length=16, description="today, week, month or "
                                                                               "YYYY-MM (UTC)")] = None,
                by: Annotated[GroupBy | None, Query(description="group by (default user)")] = None) -> CostReport:
    return await get_service(request).costs(actor, period, by.value if by else None)


@router.get("/statistics", response_model=StatisticsResult, responses=RESPONSES, tags=["money"],
            summary="Fleet statistics: counts, average $/h, by GPU model, state and provider")
async def statistics(request: Request, actor: CurrentActor) -> StatisticsResult:
    return await get_service(request).statistics(actor)


@router.get("/budgets", response_model=BudgetResult, responses=RESPONSES, tags=["money"],
            summary="This month's budgets and their use")
async def budgets(request: Request, actor: CurrentActor) -> BudgetResult:
    return await get_service(request).budgets(actor)


@router.put("/budgets/{scope}/{name}", response_model=BudgetResult, responses=RESPONSES, tags=["money"],
            summary="Set a team's or a user's monthly budget (admins)")
async def set_budget(request: Request, actor: CurrentActor, scope: BudgetScope, name: BudgetName,
                     body: BudgetBody) -> BudgetResult:
    return await get_service(request).set_budget(actor, scope.value, name, body.amount, body.hard_cap)


@router.delete("/budgets/{scope}/{name}", response_model=BudgetResult, responses=RESPONSES, tags=["money"],
               summary="Remove a budget (admins)")
async def clear_budget(request: Request, actor: CurrentActor, scope: BudgetScope, name: BudgetName) -> BudgetResult:
    return await get_service(request).clear_budget(actor, scope.value, name)


@router.get("/audit", response_model=AuditResult, responses=RESPONSES, tags=["administration"],
            summary="Audit events, newest first, one page (admins)")
async def audit(request: Request, actor: CurrentActor,
                limit: Annotated[int, Query(ge=1, le=500)] = 20,
                cursor: Annotated[str | None, Query(max_length=MAX_CURSOR)] = None,
                instance: Annotated[str | None, Query(min_length=1, max_length=32,
                                                      description="only this instance's events")] = None,
                ) -> AuditResult:
    return await get_service(request).audit(actor, limit, instance, cursor)


@router.get("/users", response_model=list[UserView], responses=RESPONSES, tags=["administration"],
            summary="Every known principal with role and team (admins)")
async def users(request: Request, actor: CurrentActor) -> list[UserView]:
    return await get_service(request).users(actor)


@router.put("/users/{principal}", response_model=UserView, responses=RESPONSES, tags=["administration"],
            summary="Set a principal's role or team (admins)")
async def set_user(request: Request, actor: CurrentActor, principal: Principal, body: UserBody) -> UserView:
    return await get_service(request).set_user(actor, principal, role=body.role, team=body.team)


@router.get("/keys", response_model=list[KeyView], responses=RESPONSES, tags=["administration"],
            summary="API keys (ids and owners, never the keys) (admins)")
async def keys(request: Request, actor: CurrentActor,
               include_revoked: Annotated[bool, Query()] = False) -> list[KeyView]:
    return await get_service(request).list_keys(actor, include_revoked=include_revoked)


@router.post("/keys", status_code=201, response_model=CreatedKey, responses=RESPONSES, tags=["administration"],
             summary="Create an API key for a principal (admins); the only time the key is shown")
async def create_key(request: Request, actor: CurrentActor, body: KeyBody, response: Response) -> CreatedKey:
    created = await get_service(request).create_key(actor, body.principal, role=body.role, name=body.name)
    response.headers["Cache-Control"] = "no-store"
    return created


@router.delete("/keys/{key_id}", response_model=KeyView, responses=RESPONSES, tags=["administration"],
               summary="Revoke an API key (admins)")
async def revoke_key(request: Request, actor: CurrentActor,
                     key_id: Annotated[str, Path(min_length=1, max_length=16)]) -> KeyView:
    return await get_service(request).revoke_key(actor, key_id)
