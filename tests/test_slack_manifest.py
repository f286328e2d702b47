"""The Slack app manifests in manifests/ (slack.yaml for Socket Mode, slack-http.yaml for a public
Request URL) keep to the rules of Slack's manifest schema (slackapi/manifest-schema, v1; the rules
are listed in the chat platforms reference §1.7), ask for exactly the scopes the bot uses, and
advertise in the /gpu usage hint only commands the grammar has.

The schema file itself is not vendored, so its rules that matter here are checked by hand."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuherd.bot.grammar import REGISTRY

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the manifests (pip install pyyaml)")

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
SOCKET, HTTP = "slack.yaml", "slack-http.yaml"
BOTH = pytest.mark.parametrize("name", [SOCKET, HTTP])

# Adding a scope is a decision (every install shows it to a workspace admin): change it here too.
BOT_SCOPES = {"commands", "chat:write", "chat:write.public", "im:write", "users:read"}
TOP_LEVEL = {"_metadata", "display_information", "features", "oauth_config", "settings"}
SETTINGS = {"interactivity", "socket_mode_enabled", "org_deploy_enabled", "token_rotation_enabled", "event_subscriptions"}
EVENTS_PATH = "/slack/events"


def _load(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]
    assert len(docs) == 1, name
    assert isinstance(docs[0], dict), name
    return docs[0]


def _urls(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every URL-valued key (`url`, `*_url`) and every string that looks like a URL, with its path."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "url" or str(key).endswith("_url"):
                yield here, value
            else:
                yield from _urls(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _urls(value, f"{path}[{i}]")
    elif isinstance(node, str) and re.search(r"\w+://", node):
        yield path, node


@BOTH
def test_metadata_and_display_information_keep_to_the_schema(name: str) -> None:
    m = _load(name)
    assert m["_metadata"]["major_version"] == 1
    info = m["display_information"]
    assert isinstance(info["name"], str) and 1 <= len(info["name"]) <= 35
    assert info["name"] == "gpuherd"
    assert isinstance(info["description"], str) and 0 < len(info["description"]) <= 140
    assert isinstance(info["long_description"], str) and 175 <= len(info["long_description"]) <= 4000
    # an unquoted #rrggbb is a YAML comment and would load as None
    assert isinstance(info["background_color"], str) and re.fullmatch(r"#[0-9a-fA-F]{6}", info["background_color"])


@BOTH
def test_only_keys_the_schema_knows_at_the_top_and_under_settings(name: str) -> None:
    m = _load(name)
    assert set(m) <= TOP_LEVEL, sorted(set(m) - TOP_LEVEL)
    assert set(m["settings"]) <= SETTINGS, sorted(set(m["settings"]) - SETTINGS)
    assert m["settings"]["org_deploy_enabled"] is False
    assert m["settings"]["token_rotation_enabled"] is False


@BOTH
def test_the_gpu_slash_command_keeps_to_the_schema(name: str) -> None:
    commands = _load(name)["features"]["slash_commands"]
    assert isinstance(commands, list) and 1 <= len(commands) <= 50
    for c in commands:
        assert isinstance(c["command"], str) and 2 <= len(c["command"]) <= 32 and c["command"].startswith("/")
        assert isinstance(c["description"], str) and 0 < len(c["description"]) <= 2000
        assert len(c.get("usage_hint", "")) <= 1000
        assert c.get("should_escape", False) is False
    [gpu] = commands
    assert gpu["command"] == "/gpu"
    assert gpu["description"] == "Find, boot, stop and cost cloud GPUs"
    assert gpu["usage_hint"]


@BOTH
def test_bot_user_and_app_home(name: str) -> None:
    features = _load(name)["features"]
    assert features["bot_user"] == {"display_name": "gpuherd", "always_online": True}
    home = features["app_home"]
    assert home["home_tab_enabled"] is True
    # warnings arrive as DMs from the bot, which reads no typed messages
    assert home["messages_tab_enabled"] is True and home["messages_tab_read_only_enabled"] is True


@BOTH
def test_bot_scopes_are_exactly_the_five_the_bot_uses(name: str) -> None:
    scopes = _load(name)["oauth_config"]["scopes"]
    assert set(scopes) == {"bot"}, "no user scopes"
    assert len(scopes["bot"]) == len(set(scopes["bot"])), "a scope listed twice"
    assert set(scopes["bot"]) == BOT_SCOPES


@BOTH
def test_app_home_opened_is_the_only_event_and_buttons_are_on(name: str) -> None:
    settings = _load(name)["settings"]
    assert settings["event_subscriptions"]["bot_events"] == ["app_home_opened"]
    assert "user_events" not in settings["event_subscriptions"]
    assert settings["interactivity"]["is_enabled"] is True


def test_the_socket_mode_manifest_has_no_url() -> None:
    m = _load(SOCKET)
    assert m["settings"]["socket_mode_enabled"] is True
    assert list(_urls(m)) == []


def test_the_http_manifest_points_every_url_at_slack_events_over_https() -> None:
    m = _load(HTTP)
    assert m["settings"]["socket_mode_enabled"] is False
    urls = dict(_urls(m))
    # the command, the button clicks and the events all need a Request URL in HTTP mode
    assert {"features.slash_commands[0].url", "settings.interactivity.request_url",
            "settings.event_subscriptions.request_url"} <= set(urls)
    for where, url in urls.items():
        assert isinstance(url, str) and url.startswith("https://") and url.endswith(EVENTS_PATH), (where, url)
    text = (MANIFESTS / HTTP).read_text()
    assert any(line.lstrip().startswith("#") and "replace" in line.lower() and "host" in line.lower()
               for line in text.splitlines()), "a comment says to replace the host"


def test_the_two_manifests_differ_only_in_transport() -> None:
    """Apart from the URLs and socket_mode_enabled, the HTTP variant is the Socket Mode one."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if k != "url" and not str(k).endswith("_url") and k != "socket_mode_enabled"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    assert strip(_load(HTTP)) == strip(_load(SOCKET))


@BOTH
def test_the_usage_hint_names_only_commands_the_grammar_has(name: str) -> None:
    usage = {n: c.usage for c in REGISTRY.all() for n in (c.name, *c.aliases)}
    known = {c.name for c in REGISTRY.all()} | {a for c in REGISTRY.all() for a in c.aliases}
    assert known == set(usage)
    [gpu] = _load(name)["features"]["slash_commands"]
    parts = [p.strip() for p in gpu["usage_hint"].split("|")]
    assert parts and all(parts), gpu["usage_hint"]
    words = [p.split()[0] for p in parts]
    assert set(words) <= known, sorted(set(words) - known)
    for part, word in zip(parts, words, strict=True):
        # a <placeholder> in the hint is one the command's own usage line has
        for placeholder in re.findall(r"<\w+>", part):
            assert placeholder in usage[word], (part, usage[word])
