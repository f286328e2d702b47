"""Request bodies and parameter bounds of the HTTP API (`/api/v1`). Answers are core's own
result models (core/results.py, core/statistics.py): this module describes only what a client
sends.

Decisions:

- Every string has a `max_length` and every number a range, and text that may be stored
  (names, teams, labels, activity details) has no control characters — PostgreSQL refuses a
  NUL in a text column, which would otherwise be a 500; so no request makes core parse
  megabytes; the bounds are core's own (`core.text`: a name is at most `MAX_NAME` characters, a
  query `MAX_QUERY`, an override value `MAX_WORD`; an idempotency key 200, as `booting.MAX_KEY`).
  A value outside them is a 422 problem naming the field (app.py).
- The models check shape only. Whether a template exists, a duration parses, a role may do
  something or an amount is a sensible budget is core's to say (400/403/404 with core's
  message), so the API and chat refuse the same things with the same words.
- Bodies forbid unknown fields: a misspelt `overides` is a 422 naming it, not a boot without
  the overrides the caller meant.
- Money is `Decimal` (a JSON number or a decimal string), never a float."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gpuherd.core.text import MAX_NAME, MAX_QUERY, MAX_WORD

MAX_KEY = 200                 # an Idempotency-Key (core/booting.py MAX_KEY)
MAX_CURSOR = 100              # every cursor core gives out is shorter
MAX_OVERRIDES = 32            # a template takes about 16
MAX_TEMPLATE = 64             # templates.NAME_RE
MAX_BUDGET = Decimal("10000000")   # core refuses more (costs.MAX_BUDGET); bounded here for the schema

NO_CONTROL = r"^[^\x00-\x1f\x7f]*$"   # text that may be stored: no NUL (PostgreSQL refuses it), no controls
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME)]
RoleName = Literal["viewer", "member", "admin"]
OverrideKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEMPLATE, pattern=NO_CONTROL)]
OverrideValue = Annotated[str, StringConstraints(max_length=MAX_WORD)]

# query-parameter bounds (used by the routes' Query(...) declarations)
GPU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"      # a model word or name; `_` stands for a space
PROVIDER_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
PRINCIPAL_PATTERN = rf"^[^\s\x00-\x1f\x7f]{{1,{MAX_NAME}}}$"   # no spaces, as core/keys.py requires of a key's user
TOKEN_PATTERN = r"^c_[A-Za-z0-9_-]{22,62}$"             # core/confirmations.py's token shape


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BootBody(_Body):
    """What to boot: a template, optionally a given offer or provider, and overrides."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"template": "budget"}, {"template": "budget", "overrides": {"max_model_len": "4096"}}]})

    template: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEMPLATE, pattern=NO_CONTROL)] = Field(
        description="template name (`GET /api/v1/templates` lists them)", examples=["budget"])
    offer: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME, pattern=NO_CONTROL)] | None = Field(
        default=None, description="an offer ref from a search (`provider:offer_id`); default: the cheapest that fits")
    provider: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=NO_CONTROL)] | None = Field(
        default=None, description="only offers of this provider")
    overrides: dict[OverrideKey, OverrideValue] = Field(
        default_factory=dict, max_length=MAX_OVERRIDES,
        description="template overrides, e.g. {\"max_model_len\": \"8192\", \"env.HF_TOKEN\": \"…\"}")


class KeepBody(_Body):
    duration: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=NO_CONTROL)] | None = Field(
        default=None, description="how long to postpone idle shutdown: 1h, 30m, 2d (default 1 h, at most 7 days)")


class ActivityBody(_Body):
    source: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{0,31}$")] = Field(
        default="ping", description="who saw the use: ping, gateway, notebook …")
    detail: Annotated[str, StringConstraints(max_length=256, pattern=NO_CONTROL)] | None = Field(
        default=None, description="free text kept with the activity record")


class BudgetBody(_Body):
    amount: Annotated[Decimal, Field(ge=0, le=MAX_BUDGET, max_digits=16, decimal_places=6)] = Field(
        description="USD a month (a number or a decimal string)")
    hard_cap: bool | None = Field(default=None, description="refuse boots past the budget instead of asking "
                                                            "(default: leave as it is; off for a new budget)")


class UserBody(_Body):
    role: RoleName | None = None
    team: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=NO_CONTROL)] | None = None


class KeyBody(_Body):
    principal: Annotated[str, StringConstraints(pattern=PRINCIPAL_PATTERN)] = Field(
        description="who the key speaks for, e.g. api:alice (no spaces)", examples=["api:alice"])
    role: RoleName | None = Field(default=None, description="the most the key may do (default: its user's role)")
    name: Annotated[str, StringConstraints(max_length=64, pattern=NO_CONTROL)] = Field(default="",
                                                                                       description="a label for lists")


__all__ = ["GPU_PATTERN", "MAX_CURSOR", "MAX_KEY", "MAX_QUERY", "NO_CONTROL", "PRINCIPAL_PATTERN", "PROVIDER_PATTERN",
           "TOKEN_PATTERN", "ActivityBody", "BootBody", "BudgetBody", "KeepBody", "KeyBody", "Name", "RoleName",
           "UserBody"]
