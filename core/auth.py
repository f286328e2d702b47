"""Who may do what (SPEC §8). Chat users, notebook and API key owners are principals with a role
and a team; every service call carries an `Actor` and the service, not the surface, checks it.

What a principal or a team name may be is `core/names.py` (one pattern each); every way one is
stored (users set, keys create, first sight in chat) checks it here before the session is used.
A display name is the platform's, shown only: it is stored without control characters and cut
to 128 characters rather than refused (a person cannot fix their Slack name to use gpuherd)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from .errors import InvalidInput, PermissionDenied
from .models import Instance, Role, User
from .names import check_principal, check_team, has_control
from .text import MAX_NAME, clip

__all__ = ["SOURCES", "Actor", "Directory", "check_principal", "check_team", "granted_role", "system_actor"]

SOURCES = ("shell", "cli", "slack", "discord", "api", "notebook", "system")


@dataclass(frozen=True)
class Actor:
    principal: str        # local:alice, slack:U123, discord:42, system:idle
    role: Role
    team: str
    source: str = "shell"
    display: str = ""

    @property
    def name(self) -> str:
        return self.display or self.principal

    def at_least(self, role: Role) -> bool:
        return self.role.rank >= role.rank

    def require(self, role: Role, doing: str) -> None:
        if not self.at_least(role):
            raise PermissionDenied(
                f"You ({self.name}) are a {self.role.value}; {doing} needs the {role.value} role. "
                "Ask an admin of your gpuherd.")

    def may_act_on(self, instance: Instance) -> bool:
        return self.role is Role.ADMIN or (self.role is Role.MEMBER and instance.owner == self.principal)


def granted_role(mapping: dict[str, str], held: Iterable[str]) -> Role | None:
    """The highest gpuherd role a platform's roles map to (config `discord_roles`: role name or
    id -> viewer|member|admin; names compare case-insensitively), or None."""
    lowered = {k.casefold(): Role(v) for k, v in mapping.items()}
    best: Role | None = None
    for name in held:
        role = lowered.get(str(name).casefold())
        if role is not None and (best is None or role.rank > best.rank):
            best = role
    return best


def _display(display: str) -> str:
    """A platform's display name made storable: control and invisible characters dropped, cut."""
    if has_control(display):
        display = "".join(c for c in display if not has_control(c))
    return display[:MAX_NAME]


def system_actor(name: str = "system") -> Actor:
    return Actor(principal=f"system:{name}", role=Role.ADMIN, team="*", source="system")


class Directory:
    """Maps principals to roles and teams. Unknown chat users are recorded on first sight with the
    default role, so an admin can later promote them with `gpuherd users set`."""

    def __init__(self, default_role: str, default_team: str, admins: list[str]) -> None:
        self.default_role = Role(default_role)
        self.default_team = default_team
        self.admins = set(admins)

    def resolve(self, session: Session, principal: str, *, source: str, now: datetime,
                display: str = "", role_hint: str | None = None, grant: Role | None = None) -> Actor:
        """`role_hint` is the role of a principal first seen (stored); `grant` a role the
        platform vouches for on this request only (a mapped Discord role): the actor has the
        higher of the stored role and the grant, and losing the platform role loses the grant."""
        check_principal(principal)
        display = _display(display)
        user = session.get(User, principal)
        if user is None:
            role = Role(role_hint) if role_hint else self.default_role
            if principal in self.admins:
                role = Role.ADMIN
            user = User(principal=principal, display_name=display, role=role.value,
                        team=self.default_team, created_at=now)
            session.add(user)
            session.commit()
        role = Role.ADMIN if principal in self.admins else Role(user.role)
        if grant is not None and grant.rank > role.rank:
            role = grant
        return Actor(principal=principal, role=role, team=user.team, source=source,
                     display=display or user.display_name)

    @staticmethod
    def set_user(session: Session, principal: str, *, role: str | None, team: str | None,
                 now: datetime) -> User:
        check_principal(principal)
        if team is not None:
            check_team(team)
        if role is not None and role not in {r.value for r in Role}:
            raise InvalidInput(f"Unknown role '{clip(role, 20)}': use viewer, member or admin.")
        user = session.get(User, principal) or User(principal=principal, role=Role.MEMBER.value,
                                                    team="default", created_at=now)
        if role:
            user.role = role
        if team:
            user.team = team
        session.add(user)
        session.commit()
        return user
