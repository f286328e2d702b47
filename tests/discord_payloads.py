"""Raw gateway `INTERACTION_CREATE` payloads in Discord's documented shape, for driving a discord.py
bot without a gateway: build one here and hand it to `client._connection.parse_interaction_create`
(what discord.py's gateway reader does with the event, discord/state.py), or to
`FakeDiscord.dispatch(client, payload)`, which also tells the fake about it.

Shape (developers/interactions/receiving-and-responding.mdx, "Interaction Object"): snowflakes are
strings; `version` is always 1; `member` (with `user`, `roles` as role-id strings, `permissions` as
a bitfield string) in a guild, `user` in a DM; `app_permissions`, `locale`, `entitlements`,
`authorizing_integration_owners` (key "0" = GUILD_INSTALL: the guild id, or "0" in the bot's DM),
`context` (0 GUILD, 1 BOT_DM). Slash-command data is `{id, name, type: 1, options}` where a
subcommand is an option of type 1 (a subcommand group type 2) holding the values; autocomplete is
the same data with one option `"focused": true`; a button press is type 3 with
`{custom_id, component_type: 2}` and the message the button is on.

What discord.py needs from these payloads (checked against discord.py 2.7.1's source):
- `Interaction._from_data` reads `attachment_size_limit` unconditionally (KeyError without it), and
  `Member(...)` reads `member["flags"]` and `member["roles"]`; both are always included here.
- `interaction.user.roles` is built from the *guild's role cache*: `Member.roles` maps each id in
  `member.roles` through `guild.get_role`, silently dropping ids it does not know. An interaction
  for a guild discord.py has not seen (no gateway GUILD_CREATE) gets an empty "unavailable" guild
  (`ConnectionState._get_or_create_unavailable_guild`), so `roles` is `[]`, and
  `app_commands.checks.has_role("name")` fails, although the role ids are in the payload. The
  `resolved.roles` of an interaction does not help: Discord fills it only for role/mentionable
  *option values*, and discord.py turns it into option values (app_commands/namespace.py), never
  into guild cache entries. `add_guild()` below feeds a documented GUILD_CREATE payload to
  `client._connection.parse_guild_create`, as the gateway would on connect; after it, `roles`
  resolves to `Role` objects with names (`@everyone` included, as on Discord). Without a READY the
  state has no `_ready_state` queue, so parse_guild_create stores the guild at once and dispatches
  `guild_join`; with default intents (no members intent) it does not try to chunk.
- A DynamicItem button is only dispatched when `interaction.message` holds a component with that
  `custom_id` (`ViewStore.schedule_dynamic_item_call` rebuilds the view from the message), so
  `component()` adds an action row with the button when the given message has no components.

Simplifications: tokens are random url-safe strings (Discord's are opaque too); `guild` is the
partial `{id, locale, features}` Discord sends; channel objects are the partial text channel / DM
channel Discord sends with `permissions` for the invoker.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

DISCORD_EPOCH_MS = 1420070400000

APP_ID = "1310000000000000001"      # also the bot user's id, as for every application made since 2016
GUILD_ID = "1310000000000000002"
CHANNEL_ID = "1310000000000000003"
USER_ID = "1310000000000000004"

# permission bits (developers/topics/permissions.mdx)
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_EXTERNAL_EMOJIS = 1 << 18
USE_APPLICATION_COMMANDS = 1 << 31
MEMBER_PERMISSIONS = VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY | USE_APPLICATION_COMMANDS
APP_PERMISSIONS = MEMBER_PERMISSIONS | USE_EXTERNAL_EMOJIS
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

_lock = threading.Lock()
_last = 0
_dm_channels: dict[str, str] = {}


def next_snowflake() -> str:
    """A new snowflake (as a string), strictly greater than every earlier one in this process, with
    the current time in its top bits (discord.py reads creation times from ids, e.g. to pick the
    sub-rate-limit of a message delete)."""
    global _last
    with _lock:
        stamp = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        value = max(stamp | (1 << 17), _last + 1)       # worker 1, process 0, increment
        _last = value
        return str(value)


def snowflake_time(snowflake: str | int) -> datetime:
    return datetime.fromtimestamp(((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000, UTC)


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


def user_object(user_id: str | int, username: str | None = None, *, bot: bool = False) -> dict[str, Any]:
    """A user object (developers/resources/user.mdx); usernames are unique, discriminator "0"."""
    uid = str(user_id)
    name = username or f"user{uid[-4:]}"
    user: dict[str, Any] = {
        "id": uid, "username": name, "global_name": None if bot else name.title(), "discriminator": "0",
        "avatar": None, "public_flags": 0, "avatar_decoration_data": None,
    }
    if bot:
        user["bot"] = True
    return user


def role_object(role_id: str | int, name: str, *, position: int = 1, permissions: int = 0) -> dict[str, Any]:
    """A role object (developers/topics/permissions.mdx, "Role Object")."""
    return {
        "id": str(role_id), "name": name, "color": 0,
        "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
        "hoist": False, "icon": None, "unicode_emoji": None, "position": position,
        "permissions": str(permissions), "managed": False, "mentionable": False, "flags": 0,
    }


def text_channel_object(channel_id: str | int, guild_id: str | int, *, name: str = "gpu-ops",
                        permissions: int | None = None) -> dict[str, Any]:
    """A guild text channel (type 0); `permissions` is what Discord adds in interaction payloads."""
    channel: dict[str, Any] = {
        "id": str(channel_id), "type": 0, "guild_id": str(guild_id), "name": name, "position": 0,
        "permission_overwrites": [], "nsfw": False, "topic": None, "last_message_id": None,
        "rate_limit_per_user": 0, "parent_id": None, "flags": 0,
    }
    if permissions is not None:
        channel["permissions"] = str(permissions)
    return channel


def dm_channel_object(channel_id: str | int, recipient: Mapping[str, Any]) -> dict[str, Any]:
    """A DM channel (type 1) with its one recipient."""
    return {"id": str(channel_id), "type": 1, "last_message_id": None, "flags": 0, "recipients": [dict(recipient)]}


def dm_channel_id(user_id: str | int) -> str:
    """The DM channel id payloads use for this user (stable within the process)."""
    with _lock:
        known = _dm_channels.get(str(user_id))
    if known is None:
        fresh = next_snowflake()
        with _lock:
            known = _dm_channels.setdefault(str(user_id), fresh)
    return known


def _option_type(name: str, value: Any) -> int:
    if isinstance(value, bool):             # before int: bool is an int
        return 5
    if isinstance(value, int):
        return 4
    if isinstance(value, float):
        return 10
    if isinstance(value, str):
        return 3
    raise TypeError(f"option {name!r}: cannot infer a Discord option type for {type(value).__name__}; pass raw option dicts")


def _options(options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    if options is None:
        return []
    if isinstance(options, Mapping):
        return [{"name": k, "type": _option_type(k, v), "value": v} for k, v in options.items() if v is not None]
    return [dict(o) for o in options]


def _nest(sub: str | None, values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`sub` is "search" (a subcommand, type 1), "admin grant" (group type 2 > subcommand type 1),
    or None (options of a top-level command)."""
    if not sub:
        return values
    parts = sub.split()
    if len(parts) == 1:
        return [{"name": parts[0], "type": 1, "options": values}]
    if len(parts) == 2:
        return [{"name": parts[0], "type": 2, "options": [{"name": parts[1], "type": 1, "options": values}]}]
    raise ValueError("Discord nests at most command > group > subcommand")


def _base(kind: int, *, user_id: str | int, guild_id: str | int | None, channel_id: str | int | None,
          roles: Iterable[str | int], app_id: str | int, username: str | None, locale: str,
          permissions: int, channel_name: str) -> dict[str, Any]:
    user = user_object(user_id, username)
    payload: dict[str, Any] = {
        "id": next_snowflake(),
        "application_id": str(app_id),
        "type": kind,
        "token": secrets.token_urlsafe(48),
        "version": 1,
        "locale": locale,
        "app_permissions": str(APP_PERMISSIONS),
        "entitlements": [],
        "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
    }
    if guild_id is not None:
        gid = str(guild_id)
        cid = str(channel_id or CHANNEL_ID)
        payload.update({
            "guild_id": gid,
            "guild": {"id": gid, "locale": "en-US", "features": []},
            "guild_locale": "en-US",
            "channel_id": cid,
            "channel": text_channel_object(cid, gid, name=channel_name, permissions=permissions),
            "member": {
                "user": user, "roles": [str(r) for r in roles], "permissions": str(permissions),
                "joined_at": "2025-01-06T10:00:00.000000+00:00", "premium_since": None, "nick": None,
                "avatar": None, "banner": None, "pending": False, "mute": False, "deaf": False, "flags": 0,
                "communication_disabled_until": None, "unusual_dm_activity_until": None,
            },
            "authorizing_integration_owners": {"0": gid},
            "context": 0,
        })
    else:
        cid = str(channel_id or dm_channel_id(user_id))
        payload.update({
            "channel_id": cid,
            "channel": dm_channel_object(cid, user),
            "user": user,
            "authorizing_integration_owners": {"0": "0"},
            "context": 1,
        })
    return payload


def _resolved(resolved_roles: Mapping[str | int, str | Mapping[str, Any]] | None) -> dict[str, Any] | None:
    if not resolved_roles:
        return None
    roles = {str(k): (dict(v) if isinstance(v, Mapping) else role_object(k, v)) for k, v in resolved_roles.items()}
    return {"roles": roles}


def command(name: str, sub: str | None = None, options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, *,
            user_id: str | int = USER_ID, guild_id: str | int | None = GUILD_ID, channel_id: str | int | None = None,
            roles: Iterable[str | int] = (), resolved_roles: Mapping[str | int, str | Mapping[str, Any]] | None = None,
            app_id: str | int = APP_ID, command_id: str | int | None = None, command_guild_id: str | int | None = None,
            username: str | None = None, locale: str = "en-US", permissions: int = MEMBER_PERMISSIONS,
            channel_name: str = "gpu-ops") -> dict[str, Any]:
    """An APPLICATION_COMMAND (type 2) interaction for `/name sub opt:value ...`.

    `options` is a dict (types inferred: str 3, int 4, bool 5, float 10; None values are left out,
    as Discord leaves out unset options) or a list of raw option dicts (for user/role/channel
    options, type 6/8/7, whose `value` is an id: pass `resolved_roles` then). `guild_id=None` makes
    a DM interaction (`user` instead of `member`). `command_guild_id` is set when the command is
    registered to a guild (discord.py then looks it up among that guild's commands)."""
    data: dict[str, Any] = {
        "id": str(command_id) if command_id is not None else next_snowflake(),
        "name": name,
        "type": 1,
        "options": _nest(sub, _options(options)),
    }
    resolved = _resolved(resolved_roles)
    if resolved:
        data["resolved"] = resolved
    if command_guild_id is not None:
        data["guild_id"] = str(command_guild_id)
    payload = _base(2, user_id=user_id, guild_id=guild_id, channel_id=channel_id, roles=roles, app_id=app_id,
                    username=username, locale=locale, permissions=permissions, channel_name=channel_name)
    payload["data"] = data
    return payload


def autocomplete(name: str, sub: str | None, options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
                 focused: str, **kwargs: Any) -> dict[str, Any]:
    """An APPLICATION_COMMAND_AUTOCOMPLETE (type 4) interaction: the command's data with the option
    named `focused` marked `"focused": true` (added as an empty string option when absent: the
    user has typed nothing yet). Keyword arguments are those of `command()`."""
    payload = command(name, sub, options, **kwargs)
    payload["type"] = 4
    holder: dict[str, Any] = payload["data"]
    while holder.get("options") and holder["options"][0].get("type") in (1, 2):
        holder = holder["options"][0]
    values: list[dict[str, Any]] = holder.setdefault("options", [])
    for option in values:
        if option["name"] == focused:
            option["focused"] = True
            break
    else:
        values.append({"name": focused, "type": 3, "value": "", "focused": True})
    return payload


def message_object(*, channel_id: str | int = CHANNEL_ID, message_id: str | int | None = None, content: str = "",
                   components: list[dict[str, Any]] | None = None, embeds: list[dict[str, Any]] | None = None,
                   flags: int = 0, author: Mapping[str, Any] | None = None, guild_id: str | int | None = None,
                   app_id: str | int = APP_ID) -> dict[str, Any]:
    """A message object (developers/resources/message.mdx) as the bot's own message."""
    message: dict[str, Any] = {
        "id": str(message_id) if message_id is not None else next_snowflake(),
        "channel_id": str(channel_id),
        "author": dict(author) if author is not None else user_object(app_id, "gpuherd", bot=True),
        "content": content,
        "timestamp": iso_now(),
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": embeds or [],
        "pinned": False,
        "type": 0,
        "flags": flags,
        "components": components or [],
    }
    if guild_id is not None:
        message["guild_id"] = str(guild_id)
    return message


def button_row(*custom_ids: str, label: str = "Press") -> dict[str, Any]:
    """An action row (type 1) of primary buttons (type 2, style 1)."""
    return {"type": 1, "components": [{"type": 2, "style": 1, "label": label, "custom_id": c} for c in custom_ids]}


def component(custom_id: str, *, message: Mapping[str, Any], user_id: str | int = USER_ID,
              guild_id: str | int | None = GUILD_ID, channel_id: str | int | None = None,
              roles: Iterable[str | int] = (), app_id: str | int = APP_ID, component_type: int = 2,
              values: Sequence[str] | None = None, username: str | None = None, locale: str = "en-US",
              permissions: int = MEMBER_PERMISSIONS, channel_name: str = "gpu-ops") -> dict[str, Any]:
    """A MESSAGE_COMPONENT (type 3) interaction: a press of the button `custom_id` (or a select,
    `component_type` 3 with `values`) on `message`. `message` is a message as `FakeDiscord`
    stored it, or a minimal dict (`id`, `channel_id`, optionally `components`) completed here; a
    message without components gets one action row holding the button."""
    given = dict(message)
    cid = str(channel_id or given.get("channel_id") or CHANNEL_ID)
    full = message_object(channel_id=cid, message_id=given.get("id"), app_id=app_id)
    full.update(given)
    full["channel_id"] = cid
    if not full.get("components"):
        full["components"] = [button_row(custom_id)]
    data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
    if values is not None:
        data["values"] = list(values)
    payload = _base(3, user_id=user_id, guild_id=guild_id, channel_id=cid, roles=roles, app_id=app_id,
                    username=username, locale=locale, permissions=permissions, channel_name=channel_name)
    payload["data"] = data
    payload["message"] = full
    return payload


def guild_create(guild_id: str | int = GUILD_ID, roles: Mapping[str | int, str] | None = None, *,
                 name: str = "gpuherd test", channels: Iterable[str | int] = (CHANNEL_ID,),
                 owner_id: str | int = "1310000000000000099") -> dict[str, Any]:
    """A GUILD_CREATE payload (developers/events/gateway-events.mdx: a guild object plus joined_at,
    large, member_count, members, channels, threads, ...): the `@everyone` role (id = guild id,
    position 0) and `roles` ({id: name}), and text channels."""
    gid = str(guild_id)
    all_roles = [role_object(gid, "@everyone", position=0, permissions=MEMBER_PERMISSIONS)]
    all_roles += [role_object(rid, rname, position=i + 1) for i, (rid, rname) in enumerate((roles or {}).items())]
    return {
        "id": gid, "name": name, "icon": None, "splash": None, "discovery_splash": None, "owner_id": str(owner_id),
        "afk_channel_id": None, "afk_timeout": 300, "verification_level": 1, "default_message_notifications": 1,
        "explicit_content_filter": 2, "roles": all_roles, "emojis": [], "features": [], "mfa_level": 0,
        "application_id": None, "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
        "max_members": 500000, "vanity_url_code": None, "description": None, "banner": None, "premium_tier": 0,
        "premium_subscription_count": 0, "preferred_locale": "en-US", "public_updates_channel_id": None,
        "nsfw_level": 0, "stickers": [], "premium_progress_bar_enabled": False, "safety_alerts_channel_id": None,
        "joined_at": "2025-01-06T10:00:00.000000+00:00", "large": False, "member_count": 2, "voice_states": [],
        "members": [], "channels": [text_channel_object(c, gid) for c in channels], "threads": [], "presences": [],
        "stage_instances": [], "guild_scheduled_events": [], "soundboard_sounds": [],
    }


def add_guild(client: Any, guild_id: str | int = GUILD_ID, roles: Mapping[str | int, str] | None = None, **kwargs: Any) -> Any:
    """Make `client` know the guild and its roles as after a gateway GUILD_CREATE, so that
    `interaction.user.roles` of later interactions there has `Role` objects with names (see the
    module docstring). Returns the `discord.Guild`. Uses discord.py's private
    `client._connection.parse_guild_create` (pinned discord.py 2.7.1)."""
    payload = guild_create(guild_id, roles, **kwargs)
    client._connection.parse_guild_create(payload)
    return client.get_guild(int(payload["id"]))
