"""The Discord renderer (`bot/discord/embeds.py`) and the limits checker (`bot/discord/limits.py`).

Unit tests pin each rendering rule (pages without loss, clipping, mentions, escaping, buttons,
questions, ephemeral, notices, progress); `violations` is shown to catch every limit on hand-made
bad payloads; and a scripted session over the sandbox drives every `/gpu` command (its help, a
typical use, bad input) plus synthetic extremes, and every page of every reply must pass
`violations` (and discord.py must agree on each embed's length)."""

from __future__ import annotations

import copy
import json
import re
from datetime import UTC, datetime
from typing import Any

import discord
import pytest

from gpuherd.bot import replies
from gpuherd.bot.discord import limits
from gpuherd.bot.discord.embeds import (
    COLOURS,
    NEXT_NONE,
    PAGE_PREFIX,
    PREV_NONE,
    Button,
    DiscordMessage,
    mention,
    render,
    render_notice,
    render_progress,
)
from gpuherd.bot.discord.limits import violations
from gpuherd.bot.grammar import REGISTRY, Context, dispatch
from gpuherd.bot.replies import Action, Reply, ReplyField, Table
from gpuherd.core.actions import Action as CoreAction
from gpuherd.core.actions import Op, Style
from gpuherd.core.auth import Actor
from gpuherd.core.providers.base import CreateRequest
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.results import Confirmation, ConfirmReason
from gpuherd.core.service import GpuService
from tests.test_slack_blocks import PRICE_PROMPT, SCRIPT, command_of, price_confirmation, remember, synthetic_extremes

BOB = "discord:222222222222222222"
NAMES = {BOB: "bob", "discord:1": "Al *the* _pal_"}
PAGE_ID = re.compile(rf"^{re.escape(PAGE_PREFIX)}(\d+|none-prev|none-next)$")


# --- helpers ------------------------------------------------------------------------------------

def embed(page: DiscordMessage) -> dict[str, Any]:
    assert len(page.embeds) == 1
    return page.embeds[0]


def desc(page: DiscordMessage) -> str:
    return str(embed(page).get("description", ""))


def footer(page: DiscordMessage) -> str:
    return str(embed(page).get("footer", {}).get("text", ""))


def fields(page: DiscordMessage) -> list[dict[str, Any]]:
    return list(embed(page).get("fields", []))


def action_buttons(page: DiscordMessage) -> list[Button]:
    return [b for row in page.rows for b in row if not b.custom_id.startswith(PAGE_PREFIX)]


def page_buttons(page: DiscordMessage) -> list[Button]:
    return [b for row in page.rows for b in row if b.custom_id.startswith(PAGE_PREFIX)]


def code_blocks(text: str) -> list[list[str]]:
    """The lines of every code block in a description."""
    return [block.split("\n") for block in re.findall(r"```\n(.*?)\n```", text, flags=re.S)]


def all_ok(pages: list[DiscordMessage]) -> list[str]:
    """Problems of a rendered reply: limits, one embed a page, the page marks and page buttons."""
    problems: list[str] = []
    n = len(pages)
    if not pages:
        return ["no pages"]
    for k, page in enumerate(pages):
        payload = page.payload()
        where = f"page {k + 1}/{n}"
        problems += [f"{where}: {v}" for v in violations(payload)]
        json.dumps(payload)
        if len(page.embeds) != 1:
            problems.append(f"{where}: {len(page.embeds)} embeds")
            continue
        if len(discord.Embed.from_dict(page.embeds[0])) != limits.embed_length(page.embeds[0]):
            problems.append(f"{where}: discord.py counts the embed differently")
        nav = page_buttons(page)
        if n > 1:
            if not footer(page).endswith(f"page {k + 1}/{n}"):
                problems.append(f"{where}: footer {footer(page)[-40:]!r}")
            want = [(PREV_NONE if k == 0 else f"{PAGE_PREFIX}{k - 1}", k == 0),
                    (NEXT_NONE if k == n - 1 else f"{PAGE_PREFIX}{k + 1}", k == n - 1)]
            if [(b.custom_id, b.disabled) for b in nav] != want or page.rows[-1] != nav:
                problems.append(f"{where}: page buttons {[(b.custom_id, b.disabled) for b in nav]}")
            if [b.custom_id for b in action_buttons(page)] != [b.custom_id for b in action_buttons(pages[0])]:
                problems.append(f"{where}: not the same action buttons as page 1")
        elif nav or "page 1/1" in footer(page):
            problems.append(f"{where}: a single page has page buttons or a page mark")
        if not all(PAGE_ID.match(b.custom_id) for b in nav) or any("|" not in b.custom_id for b in action_buttons(page)):
            problems.append(f"{where}: custom_ids {page.custom_ids()}")
    return problems


def core_action(op: Op, iid: str | None = "g-7f3a", **kw: Any) -> CoreAction:
    return CoreAction(op=op, instance_id=iid, **kw)


def shown_cell(value: str, names: dict[str, str]) -> str:
    """A table cell as the renderer should show it (written out independently of embeds.py)."""
    text = re.sub(r"discord:(\d+)", lambda m: names.get(m.group(0), m.group(1)), value)
    text = re.sub(r"[\r\n\t]+", " ", text).replace("`", "ˋ")
    return text if len(text) <= 96 else text[:95] + "…"


def big_table(n: int) -> Table:
    return Table(columns=["id", "owner", "template", "$/h", "accrued"],
                 rows=[[f"g-{i:05d}", BOB if i % 2 else "discord:333", f"tpl-{i % 7}", f"${i % 13}.500/h", f"${i}.00"]
                       for i in range(n)],
                 align=["left", "left", "left", "right", "right"], caption="All of them")


# --- pages ---------------------------------------------------------------------------------------

def test_a_1000_row_table_is_paged_and_reassembles_to_the_table() -> None:
    table = big_table(1000)
    stop = Action(label="Stop g-1", command="/gpu stop g-1", ref="stop|g-1", style="danger")
    reply = Reply(title="1000 instances", text="Everything.", tables=[table], actions=[stop],
                  notes=["Simulated: sandbox provider — no real machines, no real charges."])
    pages = render(reply, NAMES)
    assert all_ok(pages) == []
    n = len(pages)
    assert n > 10
    got: list[list[str]] = []
    for k, page in enumerate(pages):
        text = desc(page)
        assert len(text) <= limits.EMBED_DESCRIPTION
        assert footer(page) == f"Simulated: sandbox provider — no real machines, no real charges.\npage {k + 1}/{n}"
        assert [(b.label, b.custom_id, b.style) for b in action_buttons(page)] == [("Stop g-1", "stop|g-1", "danger")]
        blocks = code_blocks(text)
        assert len(blocks) == 1 and text.count("```") == 2
        header, rule, *rows = blocks[0]
        assert re.fullmatch(r"id +owner +template +\$/h +accrued", header), header     # repeated on every page
        assert set(rule) == {"─"} and len(rule) == len(header)
        got += [re.split(r" {2,}", row.strip()) for row in rows]
        assert ("**All of them** (continued)" in text) == (k > 0)
    want = [[shown_cell(c, NAMES) for c in row] for row in table.rows]
    assert got == want                                   # every row, once, in order, cells as shown
    assert got[1][1] == "bob" and got[0][1] == "333"    # a name when known, else the bare id
    assert desc(pages[0]).startswith("Everything.\n\n**All of them**\n```")


def test_numbers_right_aligned_text_left_and_a_wide_cell_is_the_only_thing_clipped() -> None:
    long = "y" * 120
    table = Table(columns=["name", "cost", "n"], rows=[["a", "$1.00", "7"], ["bbbb", "$10.00", "12"], [long, "$0", "3"]],
                  align=["left", "right", "left"])
    (page,) = render(Reply(title="t", tables=[table]))
    header, rule, *rows = code_blocks(desc(page))[0]
    assert header == "name" + " " * 96 + "cost  n" and rule == "─" * (96 + 2 + 6 + 2 + 2)
    assert rows[0] == "a" + " " * 98 + "$1.00  7"
    assert rows[1] == "bbbb" + " " * 94 + "$10.00  12"
    assert rows[2] == "y" * 95 + "…" + " " * 6 + "$0  3"              # 96 characters, visibly clipped
    # with no align given, columns of numbers are right-aligned
    (auto,) = render(Reply(title="t", tables=[Table(columns=["gpu", "GB", "$/h"],
                                                    rows=[["RTX 4090", "24", "$0.301/h"], ["H100", "80", "$12.5/h"]])]))
    lines = code_blocks(desc(auto))[0]
    assert lines[0] == "gpu       GB       $/h" and lines[3] == "H100      80   $12.5/h"


def test_a_table_too_wide_for_a_line_is_split_into_column_groups_repeating_the_key() -> None:
    columns = ["id", *(f"col{i}" for i in range(1, 12))]
    rows = [[f"row-{r}", *(f"{r}-{c}-" + "v" * 30 for c in range(1, 12))] for r in range(3)]
    pages = render(Reply(title="wide", tables=[Table(columns=columns, rows=rows, caption="Wide")]))
    assert all_ok(pages) == []
    blocks = [b for p in pages for b in code_blocks(desc(p))]
    assert len(blocks) > 1 and all(len(line) <= 200 for b in blocks for line in b)
    seen: dict[str, list[str]] = {}
    for header, _rule, *body in blocks:
        heads = header.split()
        assert heads[0] == "id"
        for line in body:
            cells = line.split()
            seen.setdefault(cells[0], []).extend(cells[1:])
    assert seen == {row[0]: row[1:] for row in rows}            # every cell, under its key
    text = "\n".join(desc(p) for p in pages)
    assert re.findall(r"\*\*Wide · columns (\d+)–\d+ of 12\*\*", text)[:2] == ["1", str(len(blocks[0][0].split()) + 1)]


def test_long_text_is_paged_without_loss() -> None:
    text = "\n".join(f"line {i:05d} " + "w" * 80 for i in range(120))      # ~11,000 characters
    pages = render(Reply(title="t", text=text, fields=[ReplyField(label="a", value="b")]))
    assert all_ok(pages) == [] and len(pages) >= 3
    assert "\n".join(desc(p) for p in pages) == text          # cut at line breaks only
    assert fields(pages[-1]) == [{"name": "a", "value": "b", "inline": True}]
    word = "q" * 10_000                                         # nowhere to cut: cut anywhere
    pages = render(Reply(title="t", text=word))
    assert all_ok(pages) == [] and "".join(desc(p) for p in pages) == word


def test_a_long_title_is_clipped_and_said_in_full_in_the_description() -> None:
    title = "T" * 300 + " end"
    pages = render(Reply(title=title, text="body"))
    assert all_ok(pages) == []
    head = embed(pages[0])["title"]
    assert len(head) == limits.EMBED_TITLE and head.endswith("…") and head.startswith("T" * 255)
    assert desc(pages[0]) == f"{title}\n\nbody"
    (short,) = render(Reply(title="Templates", text="x"))
    assert embed(short)["title"] == "Templates" and desc(short) == "x"
    (empty,) = render(Reply(title="", text=""))
    assert embed(empty) == {"title": "gpuherd", "color": COLOURS["info"]}
    assert all_ok([empty]) == []


def test_fields_keep_inline_at_most_25_a_page_and_long_ones_move_to_the_description() -> None:
    many = [ReplyField(label=f"f{i}", value=f"v{i}", inline=i % 2 == 0) for i in range(30)]
    pages = render(Reply(title="t", fields=many))
    assert all_ok(pages) == [] and len(pages) == 2
    assert [f["name"] for p in pages for f in fields(p)] == [f"f{i}" for i in range(30)]
    assert len(fields(pages[0])) == 25 and [f["inline"] for f in fields(pages[1])] == [False, True, False, True, False]
    big = "z" * 2000
    (page,) = render(Reply(title="t", fields=[ReplyField(label="", value=""), ReplyField(label="provider says", value=big),
                                              ReplyField(label="rate", value="$1.00/h")]))
    assert fields(page) == [{"name": "—", "value": "—", "inline": True}, {"name": "rate", "value": "$1.00/h", "inline": True}]
    assert desc(page) == f"**provider says**\n{big}"              # not clipped: moved, whole
    assert all_ok([page]) == []


def test_notes_are_the_footer_or_when_too_long_the_end_of_the_description() -> None:
    (page,) = render(Reply(title="t", text="x", notes=["Prices from sandbox, 0s old.", "  ", "by discord:1"]), NAMES)
    assert footer(page) == "Prices from sandbox, 0s old.\nby Al *the* _pal_"     # plain text: names, no escapes
    notes = [f"note {i} " + "n" * 300 for i in range(10)]
    pages = render(Reply(title="t", text="x", notes=notes))
    assert all_ok(pages) == []
    assert "footer" not in embed(pages[0]) or not footer(pages[0]).startswith("note")
    assert "\n".join(desc(p) for p in pages).endswith("\n".join(notes))


# --- mentions and escaping -------------------------------------------------------------------------

def test_mention() -> None:
    assert mention("discord:123456789012345678 and discord:42") == "<@123456789012345678> and <@42>"
    assert mention("xdiscord:1 discord:1a discord:abc slack:U1") == "xdiscord:1 discord:1a discord:abc slack:U1"


def test_principals_are_mentions_where_they_render_and_names_elsewhere() -> None:
    reply = Reply(title=f"Budget for user {BOB}", text=f"{BOB} booted it; discord:1 watches",
                  fields=[ReplyField(label="owner", value=BOB), ReplyField(label=f"user {BOB}", value="x")],
                  tables=[Table(columns=["id", "owner"], rows=[["g-1", BOB], ["g-2", "discord:999"]])],
                  notes=[f"asked by {BOB}"],
                  actions=[Action(label=f"Stop {BOB}'s", command="/gpu stop g-1", ref="stop|g-1")])
    (page,) = render(reply, NAMES)
    assert all_ok([page]) == []
    assert embed(page)["title"] == "Budget for user bob"
    assert desc(page).startswith("<@222222222222222222> booted it; <@1> watches")
    assert fields(page)[0]["value"] == "<@222222222222222222>" and fields(page)[1]["name"] == "user bob"
    table = code_blocks(desc(page))[0]
    assert table[2] == "g-1  bob" and table[3] == "g-2  999" and "<@" not in "\n".join(table)
    assert footer(page) == "asked by bob" and action_buttons(page)[0].label == "Stop bob's"
    (named,) = render(Reply(title="by discord:1", text="x"), NAMES)
    assert embed(named)["title"] == r"by Al \*the\* \_pal\_"        # a name is user text: escaped


def test_markdown_in_user_text_is_escaped_and_links_stay_whole() -> None:
    text = "*b* _i_ ~~s~~ `c` ||spoiler|| <@999> [click](https://evil.example/x_y) \\\n> quote\n# head\nsee https://a.example/p_q*r*"
    (page,) = render(Reply(title="**T** `t`", text=text, fields=[ReplyField(label="*n*", value="> v")],
                           notes=["*note*"]))
    assert all_ok([page]) == []
    d = desc(page)
    assert d == ("\\*b\\* \\_i\\_ \\~\\~s\\~\\~ \\`c\\` \\|\\|spoiler\\|\\| \\<@999\\> \\[click\\](https://evil.example/x_y) "
                 "\\\\\n\\> quote\n\\# head\nsee https://a.example/p_q*r\\*")
    assert embed(page)["title"] == "\\*\\*T\\*\\* \\`t\\`"
    assert fields(page) == [{"name": "\\*n\\*", "value": "\\> v", "inline": True}]
    assert footer(page) == "*note*"                                 # the footer shows no markdown


def test_a_cell_cannot_close_the_code_block() -> None:
    reply = Reply(title="t", text="before", tables=[Table(columns=["cmd", "x"], rows=[["```rm -rf /```", "a\nb"],
                                                                                     ["`x`", "||s|| *y*"]])])
    (page,) = render(reply)
    assert all_ok([page]) == []
    d = desc(page)
    assert d.count("```") == 2 and d.endswith("```")
    lines = code_blocks(d)[0]
    assert lines[2] == "ˋˋˋrm -rf /ˋˋˋ  a b" and lines[3] == "ˋxˋ             ||s|| *y*"    # not escaped inside


# --- buttons -------------------------------------------------------------------------------------

def test_buttons_carry_the_ref_with_mapped_styles_and_unique_ids() -> None:
    acts = [replies.phrase(a) for a in (core_action(Op.KEEP, args={"duration": "1h"}),
                                        core_action(Op.STOP, style=Style.PRIMARY),
                                        core_action(Op.DESTROY, style=Style.DANGER, confirm=True))]
    acts += [Action(label="Typed only", command="/gpu costs"), acts[1].model_copy(update={"label": "Again"}),
             Action(label="L" * 120, command="/gpu stop g-9", ref="stop|g-9")]
    (page,) = render(Reply(title="g-7f3a", actions=acts))
    assert all_ok([page]) == []
    got = [(b.custom_id, b.style, b.label, b.disabled) for b in action_buttons(page)]
    assert got == [("keep|g-7f3a|1h", "secondary", "Keep 1 h", False), ("stop|g-7f3a", "primary", "Stop", False),
                   ("destroy|g-7f3a", "danger", "Destroy", False), ("stop|g-9", "secondary", "L" * 79 + "…", False)]
    assert page.custom_ids() == [g[0] for g in got]
    assert page.payload()["components"] == [{"type": 1, "components": [
        {"type": 2, "style": s, "label": lbl, "custom_id": c, "disabled": False}
        for (c, _, lbl, _), s in zip(got, (2, 1, 4, 2), strict=True)]}]


def test_at_most_25_buttons_and_20_with_the_page_row_the_rest_as_commands() -> None:
    acts = [Action(label=f"Stop g-{i}", command=f"/gpu stop g-{i}", ref=f"stop|g-{i}") for i in range(30)]
    (page,) = render(Reply(title="t", actions=acts))
    assert all_ok([page]) == []
    assert [len(r) for r in page.rows] == [5, 5, 5, 5, 5]
    assert desc(page) == "More:\n" + "\n".join(f"Stop g-{i}: `/gpu stop g-{i}`" for i in range(25, 30))
    pages = render(Reply(title="t", tables=[big_table(300)], actions=acts))
    assert all_ok(pages) == [] and len(pages) > 1
    for p in pages:
        assert [len(r) for r in p.rows] == [5, 5, 5, 5, 2]
        assert [b.custom_id for b in action_buttons(p)] == [f"stop|g-{i}" for i in range(20)]
    assert desc(pages[-1]).endswith("\n".join(f"Stop g-{i}: `/gpu stop g-{i}`" for i in range(20, 30)))


def test_a_price_question_shows_its_figures_and_yes_cancel_buttons() -> None:
    reply = price_confirmation()
    (page,) = render(reply)
    assert all_ok([page]) == []
    yes, no = action_buttons(page)
    assert (yes.custom_id, yes.style, yes.label) == ("confirm||c_abcdefghijklmnopqrstuvwx", "primary", "Boot anyway")
    assert (no.custom_id, no.style, no.label) == ("cancel||c_abcdefghijklmnopqrstuvwx", "secondary", "Cancel")
    assert desc(page) == PRICE_PROMPT
    assert "$0.412/h" in desc(page) and "$9.89 a day" in desc(page) and "$300.76 a month" in desc(page)
    assert [(f["name"], f["value"]) for f in fields(page)] == [("per hour", "$0.412"), ("per day", "$9.89"),
                                                               ("per month", "$300.76")]
    assert embed(page)["color"] == COLOURS["warning"] and page.ephemeral and page.payload()["flags"] == 64


def test_a_destroy_question_has_a_danger_yes_and_a_lone_confirmation_still_gets_its_button() -> None:
    c = Confirmation(operation="destroy", reason=ConfirmReason.DESTROY, title="Destroy g-7f3a?",
                     prompt="Destroy g-7f3a (budget, RTX 4090 x1 on sandbox)? Its disk and everything on it are deleted.",
                     token="c_t", expires_at=datetime(2026, 11, 10, tzinfo=UTC), instance_id="g-7f3a",
                     actions=[core_action(Op.CONFIRM, None, args={"token": "c_t"}, style=Style.DANGER),
                              core_action(Op.CANCEL, None, args={"token": "c_t"})])
    (page,) = render(replies.confirmation_reply(c))
    assert [(b.custom_id, b.style) for b in action_buttons(page)] == [("confirm||c_t", "danger"), ("cancel||c_t", "secondary")]
    yes = Action(label="Yes", command="/gpu confirm c_1", ref="confirm||c_1")
    (lone,) = render(Reply(title="Sure?", text="It costs $1.00/h, $24.00 a day, $730.00 a month.", confirmation=yes,
                           actions=[Action(label="Cancel", command="/gpu cancel c_1", ref="cancel||c_1")]))
    assert [(b.custom_id, b.style) for b in action_buttons(lone)] == [("confirm||c_1", "primary"), ("cancel||c_1", "secondary")]


def test_ephemeral_flag_content_and_colours() -> None:
    (public,) = render(Reply(title="t", level="success"))
    assert public.payload() == {"embeds": [{"title": "t", "color": COLOURS["success"]}], "components": []}
    (private,) = render(replies.error("No access.", "Ask an admin."))
    assert private.ephemeral and private.payload()["flags"] == limits.EPHEMERAL
    assert embed(private)["color"] == COLOURS["error"] and desc(private) == "No access.\nAsk an admin."
    with_content = DiscordMessage(content="<@1> look", embeds=[{"description": "x"}])
    assert with_content.payload()["content"] == "<@1> look" and "flags" not in with_content.payload()
    assert len(set(COLOURS.values())) == 4 and set(COLOURS) == {"info", "success", "warning", "error"}


# --- notices and progress --------------------------------------------------------------------------

def test_render_notice() -> None:
    acts = [replies.phrase(core_action(Op.KEEP, args={"duration": "1h"}), notice=True),
            replies.phrase(core_action(Op.STOP), notice=True), Action(label="typed", command="/gpu status")]
    message = render_notice(f"{BOB}: g-7f3a idle for 25m *now*", "warning", acts)
    assert violations(message.payload()) == []
    assert message.embeds == [{"description": "<@222222222222222222>: g-7f3a idle for 25m \\*now\\*",
                               "color": COLOURS["warning"]}]
    assert [(b.label, b.custom_id) for b in action_buttons(message)] == [("Keep 1 h", "keep|g-7f3a|1h"),
                                                                         ("Stop now", "stop|g-7f3a")]
    empty = render_notice("", "info", [])
    assert violations(empty.payload()) == [] and desc(empty) == "gpuherd notice" and not empty.rows
    long = render_notice("n" * 10_000, "error", [])
    assert violations(long.payload()) == [] and len(desc(long)) == limits.EMBED_DESCRIPTION and desc(long).endswith("…")


def test_render_progress() -> None:
    half = render_progress("Booting g-7f3a (budget)", "loading the model", 0.5)
    assert violations(half.payload()) == []
    assert embed(half) == {"title": "Booting g-7f3a (budget)", "description": "loading the model\n`██████████░░░░░░░░░░ 50%`",
                           "color": COLOURS["info"]}
    assert desc(render_progress("t", "x", 1.7)).endswith("`████████████████████ 100%`")
    assert embed(render_progress("t", "x", 1.0))["color"] == COLOURS["success"]
    assert desc(render_progress("t", "x", -1)).endswith("`░░░░░░░░░░░░░░░░░░░░ 0%`")
    unknown = render_progress("t", "created", None)
    assert desc(unknown) == "created" and not unknown.rows
    huge = render_progress("T" * 300, "w" * 5000, 0.25)
    assert violations(huge.payload()) == [] and desc(huge).endswith("25%`")


# --- violations on hand-made bad payloads -----------------------------------------------------------

def good() -> dict[str, Any]:
    return {"content": "hi", "flags": 64, "embeds": [
        {"title": "Title", "description": "body", "color": 0x5865F2, "footer": {"text": "page 1/2"},
         "author": {"name": "gpuherd"}, "fields": [{"name": "n", "value": "v", "inline": True}]}],
        "components": [{"type": 1, "components": [
            {"type": 2, "style": 4, "label": "Stop", "custom_id": "stop|g-1"},
            {"type": 2, "style": 2, "label": "Next", "custom_id": "gpuherd:page:1", "disabled": True}]}]}


def broken(change: Any) -> list[str]:
    payload = good()
    change(payload)
    return violations(payload)


def button(i: int) -> dict[str, Any]:
    return {"type": 2, "style": 2, "label": f"b{i}", "custom_id": f"id{i}"}


E = ("embeds", 0)


def at(payload: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = payload
    for key in path:
        node = node[key]
    return node


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda p: at(p, E).update(title="x" * 257), "title is 257 characters; at most 256"),
    (lambda p: at(p, E).update(title=" "), "title is empty"),
    (lambda p: at(p, E).update(description="x" * 4097), "description is 4,097 characters; at most 4,096"),
    (lambda p: at(p, E).update(description=""), "description is empty"),
    (lambda p: at(p, E).update(fields=[{"name": "n", "value": "v"}] * 26), "26 fields; at most 25"),
    (lambda p: at(p, E)["fields"][0].update(name="x" * 257), "name is 257 characters; at most 256"),
    (lambda p: at(p, E)["fields"][0].update(value="x" * 1025), "value is 1,025 characters; at most 1,024"),
    (lambda p: at(p, E)["fields"][0].update(value=""), "value is empty"),
    (lambda p: at(p, E)["fields"][0].pop("name"), "name is missing"),
    (lambda p: at(p, E)["fields"][0].update(inline="yes"), "inline is not a boolean"),
    (lambda p: at(p, E)["footer"].update(text="x" * 2049), "footer text is 2,049 characters; at most 2,048"),
    (lambda p: at(p, E)["author"].update(name="x" * 257), "author name is 257 characters; at most 256"),
    (lambda p: at(p, E).update(color=0x1000000), "is not an integer 0..0xFFFFFF"),
    (lambda p: p.update(embeds=[{"color": 1}]), "embed is empty"),
    (lambda p: p["embeds"].extend({"description": "d"} for _ in range(10)), "11 embeds; at most 10"),
    (lambda p: p["embeds"].extend({"description": "d" * 4000} for _ in range(2)), "characters of embed text in all; at most 6,000"),
    (lambda p: at(p, E).update(fields=[{"name": "n" * 200, "value": "v" * 1000}] * 5),
     "6,024 characters of embed text in all; at most 6,000"),
    (lambda p: p.update(content="c" * 2001), "content is 2,001 characters; at most 2,000"),
    (lambda p: p.update(content="", embeds=[]), "no content and no embed"),
    (lambda p: p["components"].extend({"type": 1, "components": [button(i)]} for i in range(5)), "6 action rows; at most 5"),
    (lambda p: at(p, ("components", 0, "components")).extend(button(i) for i in range(4)), "6 components in a row; at most 5"),
    (lambda p: p.update(components=[{"type": 1, "components": [button(r * 5 + i) for i in range(5)]} for r in range(7)]),
     "42 components in all; at most 40"),
    (lambda p: at(p, ("components", 0, "components", 0)).update(label="x" * 81), "label is 81 characters; at most 80"),
    (lambda p: at(p, ("components", 0, "components", 0)).update(custom_id="c" * 101), "custom_id is 101 characters; at most 100"),
    (lambda p: at(p, ("components", 0, "components", 0)).update(custom_id=""), "custom_id is missing or empty"),
    (lambda p: at(p, ("components", 0, "components", 1)).update(custom_id="stop|g-1"), "custom_id 'stop|g-1' is used twice"),
    (lambda p: at(p, ("components", 0, "components", 0)).update(style=9), "button style 9"),
    (lambda p: at(p, ("components", 0, "components", 0)).pop("label"), "a button needs a label or an emoji"),
    (lambda p: at(p, ("components", 0, "components", 0)).update(style=5), "a link button needs a url"),
    (lambda p: at(p, ("components", 0)).update(type=2), "top-level components must be action rows"),
    (lambda p: at(p, ("components", 0)).update(components=[]), "an action row needs 1 to 5 components"),
    (lambda p: at(p, ("components", 0, "components")).append({"type": 4, "custom_id": "t"}), "component type 4"),
    (lambda p: p.update(flags=2), "flags 2 sets bits a bot cannot send"),
    (lambda p: p.update(flags="64"), "is not a non-negative integer"),
])
def test_violations_catch_each_limit(change: Any, fragment: str) -> None:
    assert violations(good()) == []
    problems = broken(change)
    assert any(fragment in p for p in problems), problems


def test_violations_count_all_components_and_accept_the_maximum() -> None:
    full = {"embeds": [{"description": "d" * 4096, "title": "t" * 256, "fields": [{"name": "n", "value": "v" * 1024}],
                        "footer": {"text": "f" * 623}}],
            "components": [{"type": 1, "components": [button(r * 5 + i) for i in range(5)]} for r in range(5)]}
    assert violations(full) == []                             # exactly 6000 characters, 30 components
    full["embeds"][0]["footer"]["text"] += "f"
    assert violations(full) == ["message: 6,001 characters of embed text in all; at most 6,000"]
    assert violations([]) == ["the payload is not an object"]  # type: ignore[arg-type]
    assert violations({"content": "only text"}) == []


# --- every reply the suite can produce --------------------------------------------------------------

# The Slack script (every command: its help, a typical use, bad input), with the second person a
# Discord user; its {placeholders} are filled in by `remember` from earlier replies.
DISCORD_SCRIPT: list[tuple[str, str, str]] = [(who, line.replace("slack:U2", BOB), expect) for who, line, expect in SCRIPT]


def test_the_script_covers_every_command() -> None:
    names = {c.name for c in REGISTRY.all()}
    helped = {line.split()[2] for _, line, _ in DISCORD_SCRIPT if line.startswith("/gpu help ") and len(line.split()) == 3}
    used = {command_of(line) for _, line, expect in DISCORD_SCRIPT if expect == "ok"} - {None}
    refused = {command_of(line) for _, line, expect in DISCORD_SCRIPT if expect == "error"} - {None}
    assert helped >= names, f"no /gpu help for {names - helped}"
    assert used == names, f"never used: {names - used}"
    assert refused == names, f"never given bad input: {names - refused}"
    assert not any("slack:" in line for _, line, _ in DISCORD_SCRIPT)


def discord_extremes() -> list[Reply]:
    nasty = ["```", "`", "||x||", "<@1>", "@everyone", BOB, "a\nb", "*_~>#[]", "x" * 300]
    acts = [Action(label=f"Act {i} " + "w" * 90, command=f"/gpu stop g-{i:04d}", ref=f"stop|g-{i:04d}",
                   style="danger" if i % 3 == 0 else "primary" if i % 3 == 1 else "default") for i in range(30)]
    return [
        Reply(title="Ten thousand", text="t" * 10_000),
        Reply(title="Ten thousand words", text=" ".join(["*w_*"] * 2500), level="warning"),
        Reply(title="L" * 1000, text="long title"),
        Reply(title="Thirty fields", fields=[ReplyField(label=f"field {i} {BOB}", value=f"{BOB} ~~" * i, inline=i % 4 != 0)
                                             for i in range(30)]),
        Reply(title="Huge fields", fields=[ReplyField(label="n" * 300, value="v" * 5000) for _ in range(5)]),
        Reply(title="Thousand rows", tables=[big_table(1000)], actions=acts),
        Reply(title="Two tables", tables=[big_table(1000), Table(columns=nasty, rows=[nasty] * 300, caption="```||" * 60)]),
        Reply(title="Wide", tables=[Table(columns=[f"c{i}" for i in range(40)], rows=[["|" * 40] * 40] * 50)]),
        Reply(title="Notes", notes=[f"note {i} {BOB} " + "n" * (i * 100) for i in range(20)]),
        Reply(title="Everything " * 40, level="error", text="e*" * 5000, ephemeral=True,
              fields=[ReplyField(label=f"f{i}", value="v" * 1000) for i in range(40)],
              tables=[big_table(1000), Table(columns=nasty, rows=[nasty] * 50)], actions=acts,
              notes=[f"note {i}" for i in range(20)], confirmation=acts[3]),
    ]


@pytest.fixture
async def discord_member(service: GpuService, admin: Actor) -> Actor:
    """A Discord user in team ml who may act only on their own instances."""
    await service.set_user(admin, BOB, role="member", team="ml")
    return service.actor(BOB, source="discord")


def rows_shown(pages: list[DiscordMessage]) -> list[str]:
    return [line for p in pages for block in code_blocks(desc(p)) for line in block[2:]]


# a renderer test: the replies do not depend on the database, so SQLite only (suite time)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_every_reply_the_suite_can_produce_renders_within_the_limits(
        service: GpuService, sandbox: SandboxProvider, admin: Actor, discord_member: Actor) -> None:
    actors = {"admin": admin, "member": discord_member}
    values: dict[str, str] = {}
    rendered: list[tuple[str, Reply]] = []
    problems: list[str] = []
    offer = min(await sandbox.search(), key=lambda o: o.dph)
    values["stranger"] = (await sandbox.create(CreateRequest(offer_id=offer.offer_id, label="by-hand",
                                                             image="x/y:1"))).provider_id
    for _ in range(30):                     # a status with many instances
        r = await dispatch(Context(service=service, actor=admin, wait=False), "/gpu boot budget")
        assert r.level == "success", r.text
    used: set[str] = set()
    refused: set[str] = set()
    for who, template, expect in DISCORD_SCRIPT:
        line = template.format(**values)
        reply = await dispatch(Context(service=service, actor=actors[who], wait=True), line)
        rendered.append((line, reply))
        is_error = reply.level == "error"
        if (expect == "ok" and is_error) or (expect == "error" and not is_error):
            problems.append(f"{who}: {line!r}: expected {expect}, got {reply.level} {reply.title!r}: {reply.text[:200]}")
        name = command_of(line)
        if name:
            (refused if is_error else used).add(name)
        remember(line, reply, values)
    assert not problems, "\n".join(problems)
    assert used == refused == {c.name for c in REGISTRY.all()}

    status = await service.status(admin, include_ended=True)
    many = status.model_copy(update={"instances": [v.model_copy(update={"id": f"g-{i:08x}", "owner": f"discord:{i + 10**17}"})
                                                   for i in range(600) for v in status.instances[:1]], "total": 600})
    rendered.append(("600 instances", replies.status_reply(many)))
    rendered.append(("600 machines", replies.machines_reply(many)))
    rendered += [(f"synthetic {r.title[:30]!r}", r) for r in [*discord_extremes(), *synthetic_extremes()]]

    kinds = {"confirmation": 0, "paged": 0, "buttons": 0, "tables": 0}
    for what, reply in rendered:
        pages = render(reply, {BOB: "bob"})
        problems += [f"{what}: {p}" for p in all_ok(pages)]
        problems += [f"{what}: ephemeral {p.ephemeral}" for p in pages if p.ephemeral != reply.ephemeral]
        shown = "\n".join(desc(p) for p in pages).replace("\\", "")
        if reply.confirmation is not None:
            kinds["confirmation"] += 1
            first = action_buttons(pages[0])[0]
            if first.custom_id != reply.confirmation.ref or first.style not in ("primary", "danger"):
                problems.append(f"{what}: the yes is not the first button: {first}")
            values_shown = shown + "\n".join(f["value"] for p in pages for f in fields(p))
            for figure in re.findall(r"\$[\d,.]+(?:/h)?", reply.text):
                if figure not in values_shown:
                    problems.append(f"{what}: {figure} of the question is not shown")
        kinds["paged"] += len(pages) > 1
        kinds["buttons"] += bool(action_buttons(pages[0]))
        if reply.tables:                     # no row is lost, however many pages it takes
            kinds["tables"] += 1
            lines = iter(rows_shown(pages))
            for table in reply.tables:
                for row in table.rows or [["(no rows)"]]:
                    cell = shown_cell(row[0], {BOB: "bob"}) if row else ""
                    if not any(line.startswith(cell) for line in lines):
                        problems.append(f"{what}: row {row[:2]} is not shown (in order)")
                        break
        refs = {a.ref for a in reply.actions if a.ref} | ({reply.confirmation.ref} if reply.confirmation else set())
        if not {b.custom_id for b in action_buttons(pages[0])} <= refs:
            problems.append(f"{what}: a button that is none of the reply's actions")
        if len(refs) <= 20 and {b.custom_id for b in action_buttons(pages[0])} != refs:
            problems.append(f"{what}: an action with a ref has no button")
    assert not problems, "\n".join(problems[:40])
    assert kinds["confirmation"] >= 4 and kinds["paged"] >= 8 and kinds["buttons"] >= 10 and kinds["tables"] >= 10, kinds


def test_the_checker_in_the_session_can_fail() -> None:
    """`all_ok` (what the session asserts on every page) reports a page that breaks the rules."""
    (page,) = render(Reply(title="t", text="x"))
    bad = copy.deepcopy(page)
    bad.embeds[0]["description"] = "x" * 5000
    bad.rows = [[Button("a", "stop|g-1"), Button("b", "stop|g-1")]]
    problems = all_ok([bad])
    assert any("4,096" in p for p in problems) and any("used twice" in p for p in problems)
    pages = render(Reply(title="t", text="q" * 9000))
    pages[1].rows[-1][0].custom_id = f"{PAGE_PREFIX}7"
    assert any("page buttons" in p for p in all_ok(pages))
