"""The Slack Block Kit renderer (`bot/slack/blocks.py`) and the limits checker (`bot/slack/limits.py`).

Unit tests pin each rendering rule (escaping, mentions, pages, clipping, buttons, confirm
dialogs); `violations` is shown to catch every limit on hand-made bad payloads; and a scripted
session over the sandbox drives every `/gpu` command (its help, a typical use, bad input) plus
synthetic extremes, and every page of every reply must pass `violations`."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from gpuherd.bot import grammar, replies
from gpuherd.bot.grammar import REGISTRY, Context, dispatch
from gpuherd.bot.replies import Action, Confirm, Reply, ReplyField, Table
from gpuherd.bot.slack import limits
from gpuherd.bot.slack.blocks import ACTION_PREFIX, SlackMessage, mention, render, render_home, render_notice
from gpuherd.bot.slack.limits import violations
from gpuherd.core.actions import Action as CoreAction
from gpuherd.core.actions import Op, Style
from gpuherd.core.auth import Actor
from gpuherd.core.providers.base import CreateRequest
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.results import Confirmation, ConfirmReason, Money
from gpuherd.core.service import GpuService

ACTION_ID = re.compile(rf"^{ACTION_PREFIX}:[a-z0-9_-]+:\d+(:c)?$")


# --- helpers ------------------------------------------------------------------------------------

def texts(blocks: Any) -> list[tuple[str, str]]:
    """(type, text) of every text object in the blocks."""
    out: list[tuple[str, str]] = []
    if isinstance(blocks, dict):
        if blocks.get("type") in ("plain_text", "mrkdwn") and isinstance(blocks.get("text"), str):
            return [(blocks["type"], blocks["text"])]
        for v in blocks.values():
            out += texts(v)
    elif isinstance(blocks, list):
        for v in blocks:
            out += texts(v)
    return out


def mrkdwn_texts(message: SlackMessage) -> list[str]:
    return [t for kind, t in texts(message.blocks) if kind == "mrkdwn"] + [message.text]


def buttons(message: SlackMessage) -> list[dict[str, Any]]:
    return [el for b in message.blocks if b["type"] == "actions" for el in b["elements"]]


def all_ok(pages: list[SlackMessage]) -> None:
    assert pages
    for i, page in enumerate(pages):
        problems = violations(page.payload())
        assert problems == [], f"page {i + 1} of {len(pages)}: {problems}"
        assert page.text.strip()
    ids = [b["action_id"] for p in pages for b in buttons(p)]
    assert all(ACTION_ID.match(i) for i in ids), ids


def core_action(op: Op, iid: str | None = "g-7f3a", **kw: Any) -> CoreAction:
    return CoreAction(op=op, instance_id=iid, **kw)


PRICE_PROMPT = ("The cheapest matching offer is RTX 4090 x1 (24 GB, sandbox, Iceland) at $0.412/h, above the "
                "$0.010/h limit of 'budget'. That is $9.89 a day, $300.76 a month if left running. Boot anyway?")


def price_confirmation(prompt: str = PRICE_PROMPT) -> Reply:
    c = Confirmation(operation="boot", reason=ConfirmReason.PRICE, title="Price above limit", prompt=prompt,
                     token="c_abcdefghijklmnopqrstuvwx", expires_at=datetime(2026, 11, 10, 9, 15, tzinfo=UTC),
                     cost=Money.of(Decimal("0.412")),
                     actions=[core_action(Op.CONFIRM, None, args={"token": "c_abcdefghijklmnopqrstuvwx"},
                                          style=Style.PRIMARY),
                              core_action(Op.CANCEL, None, args={"token": "c_abcdefghijklmnopqrstuvwx"})])
    return replies.confirmation_reply(c)


# --- escaping and mentions ------------------------------------------------------------------------

def test_user_text_cannot_broadcast_or_link() -> None:
    reply = Reply(title="<!channel> & co", text="hi <!channel> <!here|here> <https://evil.example|click> a&b",
                  fields=[ReplyField(label="<!everyone>", value="<@U999> x>y")],
                  tables=[Table(columns=["a"], rows=[["<!channel>"]], caption="<!here>")],
                  notes=["<!subteam^S1>"],
                  actions=[Action(label="Help <!channel>", command="/gpu help <!channel>")])
    (page,) = render(reply)
    all_ok([page])
    for text in mrkdwn_texts(page):
        assert "<!" not in text and "<http" not in text and "<@U999>" not in text, text
    body = "\n".join(mrkdwn_texts(page))
    assert "hi &lt;!channel&gt; &lt;!here|here&gt; &lt;https://evil.example|click&gt; a&amp;b" in body
    assert "&lt;@U999&gt; x&gt;y" in body and "*&lt;!everyone&gt;*" in body
    assert page.blocks[-1]["elements"][0]["text"] == "Help &lt;!channel&gt;: `/gpu help &lt;!channel&gt;`"
    # the column is as wide as the cell shows (10), not as its escaped text (16)
    assert "*&lt;!here&gt;*\n```\na\n──────────\n&lt;!channel&gt;\n```" in body
    assert page.text.startswith("&lt;!channel&gt; &amp; co")
    # the header is plain_text: Slack does not parse it, so it is shown as typed
    assert page.blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": "<!channel> & co", "emoji": True}}


def test_principals_become_mentions_in_text_fields_and_notes_and_names_in_tables() -> None:
    names = {"slack:U0ALICE": "alice"}
    reply = Reply(title="Budget for user slack:U0ALICE", text="slack:U0ALICE booted it; slack:W0BOB watches",
                  fields=[ReplyField(label="owner", value="slack:U0ALICE"),
                          ReplyField(label="user slack:W0BOB", value="—", inline=False)],
                  tables=[Table(columns=["id", "owner"], rows=[["g-1", "slack:U0ALICE"], ["g-2", "slack:W0BOB"]])],
                  notes=["asked by slack:U0ALICE"])
    (page,) = render(reply, names)
    all_ok([page])
    text = page.blocks[1]["text"]["text"]
    assert text == "<@U0ALICE> booted it; <@W0BOB> watches"
    assert page.blocks[2]["fields"][0]["text"] == "*owner*\n<@U0ALICE>"
    assert page.blocks[3]["text"]["text"].startswith("*user <@W0BOB>*")
    table = page.blocks[4]["text"]["text"]
    assert "<@" not in table and "slack:" not in table
    assert "g-1  alice" in table and "g-2  W0BOB" in table     # a name when known, else the bare id
    assert page.blocks[5]["elements"][0]["text"] == "asked by <@U0ALICE>"
    assert page.blocks[0]["text"]["text"] == "Budget for user alice"
    assert page.text == "Budget for user <@U0ALICE>: <@U0ALICE> booted it; <@W0BOB> watches"
    # not principals: lower case, inside a word, followed by lower case
    (other,) = render(Reply(title="t", text="slack:u0abc xslack:U0ABC slack:U0ABCdef"))
    assert "<@" not in other.blocks[1]["text"]["text"]


def test_mention() -> None:
    assert mention("slack:U123", None) == "<@U123>"
    assert mention("slack:W0AB", {}) == "<@W0AB>"
    assert mention("local:alice", None) == "alice"
    assert mention("discord:42", {"discord:42": "Bob <b> & co"}) == "Bob &lt;b&gt; &amp; co"
    assert mention("api:<!channel>", None) == "api:&lt;!channel&gt;"


# --- tables and pages ----------------------------------------------------------------------------

def wide_table(n: int) -> Table:
    return Table(columns=["id", "owner", "template", "gpu", "$/h", "accrued", "note"],
                 rows=[[f"row-{i:04d}", "slack:U0ALICE", "llama-3.1-70b", "H100 SXM x8", "$24.000/h",
                        f"${i}.00", "x" * 38] for i in range(n)],
                 align=["left", "left", "left", "left", "right", "right", "left"], caption="All of them")


def test_a_500_row_table_is_split_over_pages_and_no_row_is_lost() -> None:
    reply = Reply(title="500 instances", text="Everything.", tables=[wide_table(500)],
                  actions=[Action(label="Costs", command="/gpu costs", ref="costs|")])
    pages = render(reply, {"slack:U0ALICE": "alice"})
    all_ok(pages)
    assert len(pages) > 1
    n = len(pages)
    seen: list[str] = []
    header_rows = 0
    for k, page in enumerate(pages, start=1):
        assert len(page.blocks) <= limits.BLOCKS_PER_MESSAGE
        assert limits.blocks_text_length(page.blocks) <= limits.PAGE_TEXT_BUDGET
        context = [t for b in page.blocks if b["type"] == "context" for _, t in texts(b)]
        assert f"500 instances (page {k} of {n})" in context
        for block in page.blocks:
            if block["type"] == "section" and "```" in block["text"]["text"]:
                body = block["text"]["text"]
                assert body.count("```") == 2
                lines = body.split("```")[1].strip("\n").split("\n")
                assert re.match(r"id +owner +template", lines[0])      # every piece repeats the header row
                header_rows += 1
                seen += [line.split()[0] for line in lines[2:]]
        assert (k == n) == bool(buttons(page)), "buttons are on the last page only"
    assert seen == [f"row-{i:04d}" for i in range(500)]
    assert header_rows > n
    assert pages[0].blocks[0]["type"] == "header" and all(p.blocks[0]["type"] == "context" for p in pages[1:])
    assert "*All of them* (continued)" in pages[1].blocks[1]["text"]["text"]
    assert pages[1].text == f"500 instances (page 2 of {n})"


def test_table_columns_are_padded_right_aligned_and_cells_clipped() -> None:
    long = "y" * 100
    reply = Reply(title="t", tables=[Table(columns=["name", "cost"], rows=[["a", "$1.00"], ["bbbb", "$10.00"], [long, "$0"]],
                                           align=["left", "right"])])
    (page,) = render(reply)
    lines = page.blocks[1]["text"]["text"].split("\n")
    assert lines[0] == "```" and lines[-1] == "```"
    width = len(lines[1])
    assert lines[1] == "name" + " " * (width - 8) + "cost"
    assert lines[3] == "a" + " " * (width - 6) + "$1.00"
    assert lines[4] == "bbbb" + " " * (width - 10) + "$10.00"
    assert lines[5].startswith("y" * 39 + "…") and lines[5].endswith("$0")     # 40 characters, visibly clipped
    assert set(lines[2]) == {"─"}


def test_backticks_and_entities_in_cells_do_not_break_the_code_block() -> None:
    reply = Reply(title="t", tables=[Table(columns=["cmd", "who"], rows=[["```rm -rf /```", "<@U1> & me"],
                                                                          ["`x`\nnext", "slack:U0ABC"]])])
    (page,) = render(reply)
    all_ok([page])
    body = page.blocks[1]["text"]["text"]
    assert body.count("```") == 2 and body.startswith("```\n") and body.endswith("\n```")
    assert "ˋˋˋrm -rf /ˋˋˋ" in body and "&lt;@U1&gt; &amp; me" in body and "<@" not in body
    assert "ˋxˋ next" in body and "U0ABC" in body


def test_long_title_is_clipped_with_the_level_emoji() -> None:
    for level, emoji in (("error", ":x:"), ("warning", ":warning:"), ("success", ":white_check_mark:")):
        (page,) = render(Reply(title="T" * 400, level=level))
        header = page.blocks[0]["text"]["text"]
        assert len(header) == limits.HEADER_TEXT and header.startswith(emoji + " T") and header.endswith("…")
        all_ok([page])
    (info,) = render(Reply(title="Templates"))
    assert info.blocks[0]["text"]["text"] == "Templates"


def test_fields_inline_in_sections_of_ten_and_others_on_their_own() -> None:
    fields = [ReplyField(label=f"f{i}", value=f"v{i}") for i in range(23)]
    fields.insert(12, ReplyField(label="guards", value="idle armed", inline=False))
    fields.append(ReplyField(label="big", value="z" * 5000))
    (page,) = render(Reply(title="t", fields=fields))
    all_ok([page])
    sections = page.blocks[1:]
    assert [len(s.get("fields", [])) for s in sections] == [10, 2, 0, 10, 2]
    assert sections[0]["fields"][0]["text"] == "*f0*\nv0"
    assert sections[2]["text"]["text"] == "*guards*\nidle armed"
    big = sections[4]["fields"][1]["text"]
    assert len(big) == limits.SECTION_FIELD_TEXT and big.endswith("…")


def test_long_text_is_split_into_sections_without_loss() -> None:
    text = "\n".join(f"line {i:05d} " + "w" * 80 for i in range(100))     # ~9,000 characters
    pages = render(Reply(title="t", text=text))
    all_ok(pages)
    sections = [b["text"]["text"] for p in pages for b in p.blocks if b["type"] == "section"]
    assert len(sections) >= 3 and all(len(s) <= limits.SECTION_TEXT for s in sections)
    assert "\n".join(sections) == text
    huge = render(Reply(title="t", text="q" * 50_000))
    all_ok(huge)
    last = [b["text"]["text"] for p in huge for b in p.blocks if b["type"] == "section"][-1]
    assert last.endswith("… (text clipped: 50,000 characters in all)")


def test_notes_go_in_context_blocks_of_ten() -> None:
    (page,) = render(Reply(title="t", notes=[f"note {i}" for i in range(23)]))
    all_ok([page])
    contexts = [b for b in page.blocks if b["type"] == "context"]
    assert [len(c["elements"]) for c in contexts] == [10, 10, 3]
    assert [e["text"] for c in contexts for e in c["elements"]] == [f"note {i}" for i in range(23)]


# --- buttons -------------------------------------------------------------------------------------

def test_buttons_carry_the_ref_and_unique_action_ids() -> None:
    view_actions = [replies.phrase(a) for a in (core_action(Op.KEEP, args={"duration": "1h"}),
                                                core_action(Op.STOP, style=Style.PRIMARY),
                                                core_action(Op.STOP, "g-0002"),
                                                core_action(Op.DESTROY, style=Style.DANGER, confirm=True))]
    (page,) = render(Reply(title="g-7f3a", actions=view_actions))
    all_ok([page])
    got = buttons(page)
    assert [b["value"] for b in got] == ["keep|g-7f3a|1h", "stop|g-7f3a", "stop|g-0002", "destroy|g-7f3a"]
    assert [b["text"]["text"] for b in got] == ["Keep 1 h", "Stop", "Stop", "Destroy"]
    ids = [b["action_id"] for b in got]
    assert ids == ["gpuherd:keep:1", "gpuherd:stop:2", "gpuherd:stop:3", "gpuherd:destroy:4:c"]
    assert [b.get("style") for b in got] == [None, "primary", None, "danger"]   # "default" is never sent
    assert "confirm" not in got[0]
    dialog = got[3]["confirm"]
    assert dialog["style"] == "danger" and dialog["title"]["text"] == "Destroy?"
    assert dialog["text"]["text"] == "Destroy g-7f3a: this cannot be undone."
    assert dialog["confirm"]["text"] == "Destroy" and dialog["deny"]["text"] == "Cancel"
    # a long label is clipped to 75; a ref never is: a ref too long for a value gets no button
    (page,) = render(Reply(title="t", actions=[Action(label="L" * 200, command="/gpu status", ref="status|"),
                                               Action(label="Odd", command="/gpu odd", ref="x" * 2001)]))
    (b,) = buttons(page)
    assert len(b["text"]["text"]) == 75 and b["text"]["text"].endswith("…")
    assert "Odd: `/gpu odd`" in [t for _, t in texts(page.blocks)]


def test_actions_without_ref_show_their_command() -> None:
    reply = Reply(title="Templates", actions=[Action(label="Details", command="/gpu templates research"),
                                              Action(label="Boot", command="/gpu boot `x` <!channel>"),
                                              Action(label="Status", command="/gpu status", ref="status|")])
    (page,) = render(reply)
    all_ok([page])
    assert [b["value"] for b in buttons(page)] == ["status|"]
    context = [t for b in page.blocks if b["type"] == "context" for _, t in texts(b)]
    assert context == ["Details: `/gpu templates research`", "Boot: `/gpu boot ˋxˋ &lt;!channel&gt;`"]
    assert page.blocks[-1]["type"] == "actions"


def test_thirty_actions_give_25_buttons_and_the_rest_as_commands() -> None:
    actions = [Action(label=f"Stop {i}", command=f"/gpu stop g-{i:04d}", ref=f"stop|g-{i:04d}") for i in range(30)]
    (page,) = render(Reply(title="t", actions=actions))
    all_ok([page])
    assert len(buttons(page)) == 25
    context = [t for b in page.blocks if b["type"] == "context" for _, t in texts(b)]
    assert context == [f"Stop {i}: `/gpu stop g-{i:04d}`" for i in range(25, 30)]


def test_the_yes_of_a_price_question_states_the_price() -> None:
    reply = price_confirmation()
    (page,) = render(reply)
    all_ok([page])
    yes, no = buttons(page)
    assert yes["value"] == "confirm||c_abcdefghijklmnopqrstuvwx" and yes["style"] == "primary"
    assert yes["action_id"] == "gpuherd:confirm:1:c" and no["action_id"] == "gpuherd:cancel:2"
    assert yes["confirm"]["text"]["text"] == PRICE_PROMPT and yes["confirm"]["style"] == "primary"
    assert yes["confirm"]["confirm"]["text"] == "Yes"
    # a question too long for the dialog keeps its price sentences
    long = "This offer was picked for reasons worth stating at some length. " * 5 + PRICE_PROMPT
    (page,) = render(price_confirmation(long))
    all_ok([page])
    dialog = buttons(page)[0]["confirm"]["text"]["text"]
    assert len(dialog) <= limits.CONFIRM_TEXT
    assert "at $0.412/h" in dialog and "That is $9.89 a day, $300.76 a month if left running." in dialog
    assert dialog.endswith("Boot anyway?")


def test_a_danger_yes_gets_a_danger_dialog() -> None:
    c = Confirmation(operation="destroy", reason=ConfirmReason.DESTROY, title="Destroy g-7f3a?",
                     prompt="Destroy g-7f3a (budget, RTX 4090 x1 on sandbox)? Its disk and everything on it are deleted.",
                     token="c_t", expires_at=datetime(2026, 11, 10, tzinfo=UTC), instance_id="g-7f3a",
                     actions=[core_action(Op.CONFIRM, None, args={"token": "c_t"}, style=Style.DANGER),
                              core_action(Op.CANCEL, None, args={"token": "c_t"})])
    (page,) = render(replies.confirmation_reply(c))
    yes = buttons(page)[0]
    assert yes["style"] == "danger" and yes["confirm"]["style"] == "danger"
    assert yes["confirm"]["text"]["text"].startswith("Destroy g-7f3a (budget")
    assert yes["action_id"].endswith(":c")


def test_a_confirmation_missing_from_the_actions_still_gets_its_button() -> None:
    yes = Action(label="Yes", command="/gpu confirm c_1", ref="confirm||c_1")
    (page,) = render(Reply(title="Sure?", text="It costs $1.00/h, $24.00 a day, $730.00 a month.", confirmation=yes))
    (b,) = buttons(page)
    assert b["value"] == "confirm||c_1" and "$24.00 a day" in b["confirm"]["text"]["text"]


# --- notices and the Home ------------------------------------------------------------------------

def test_render_notice() -> None:
    actions = [replies.phrase(core_action(Op.KEEP, args={"duration": "1h"}), notice=True),
               replies.phrase(core_action(Op.STOP), notice=True)]
    message = render_notice("slack:U0ALICE: g-7f3a idle for 25m <!channel>", "warning", actions)
    assert violations(message.payload()) == []
    assert message.blocks[0]["text"]["text"] == ":warning: <@U0ALICE>: g-7f3a idle for 25m &lt;!channel&gt;"
    assert message.text == "<@U0ALICE>: g-7f3a idle for 25m &lt;!channel&gt;"
    assert [b["text"]["text"] for b in buttons(message)] == ["Keep 1 h", "Stop now"]
    assert message.payload() == {"text": message.text, "blocks": message.blocks}
    empty = render_notice("", "info", [])
    assert violations(empty.payload()) == [] and empty.text


def test_render_home_parts_with_dividers_and_rows_left_out_stated() -> None:
    status = Reply(title="3 instances", tables=[wide_table(3)], actions=[Action(label="Stop", command="/gpu stop g-1",
                                                                               ref="stop|g-1")])
    costs = Reply(title="Costs", fields=[ReplyField(label="spend", value="$1.00")],
                  actions=[Action(label="Stop", command="/gpu stop g-1", ref="stop|g-1")])
    view = render_home([status, costs])
    assert violations(view, home=True) == []
    kinds = [b["type"] for b in view["blocks"]]
    assert kinds == ["header", "section", "actions", "divider", "header", "section", "actions"]
    assert [b["action_id"] for b in view["blocks"] if b["type"] == "actions" for b in b["elements"]] \
        == ["gpuherd:stop:1", "gpuherd:stop:2"]
    big = render_home([Reply(title="Lots", tables=[wide_table(3000)]), costs])
    assert violations(big, home=True) == []
    assert len(big["blocks"]) == limits.BLOCKS_PER_VIEW
    ids = [line.split()[0] for b in big["blocks"] if b["type"] == "section" and "```" in b.get("text", {}).get("text", "")
           for line in b["text"]["text"].split("```")[1].strip("\n").split("\n")[2:]]
    assert ids == [f"row-{i:04d}" for i in range(len(ids))]         # the first rows, in order
    note = [t for b in big["blocks"] if b["type"] == "context" for _, t in texts(b)][-1]
    assert note == f"{3000 - len(ids):,} table rows left out to fit the Home tab; run `/gpu status` for the full list."
    assert violations(render_home([]), home=True) == []


# --- violations on hand-made bad payloads -----------------------------------------------------------

def good() -> dict[str, Any]:
    return {"text": "hi", "blocks": [
        {"type": "header", "text": {"type": "plain_text", "text": "Title"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": "body"}, "fields": [{"type": "mrkdwn", "text": "f"}]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": "note"}]},
        {"type": "actions", "elements": [
            {"type": "button", "text": {"type": "plain_text", "text": "Go"}, "value": "stop|g-1", "action_id": "gpuherd:stop:1",
             "style": "danger", "confirm": {"title": {"type": "plain_text", "text": "Sure?"},
                                            "text": {"type": "plain_text", "text": "Really."},
                                            "confirm": {"type": "plain_text", "text": "Yes"},
                                            "deny": {"type": "plain_text", "text": "No"}, "style": "danger"}}]}]}


def broken(change: Any) -> list[str]:
    payload = good()
    change(payload)
    return violations(payload)


BUTTON = ("blocks", 3, "elements", 0)


def at(payload: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = payload
    for key in path:
        node = node[key]
    return node


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda p: p["blocks"].extend({"type": "divider"} for _ in range(47)), "51 blocks; at most 50"),
    (lambda p: p["blocks"][1].update(fields=[{"type": "mrkdwn", "text": "f"}] * 11), "11 fields; at most 10"),
    (lambda p: p["blocks"][1]["text"].update(text="x" * 3001), "section text is 3,001 characters; at most 3,000"),
    (lambda p: p["blocks"][1]["fields"][0].update(text="x" * 2001), "field 0 is 2,001 characters; at most 2,000"),
    (lambda p: p["blocks"][0]["text"].update(text="x" * 151), "header text is 151 characters; at most 150"),
    (lambda p: p["blocks"][0]["text"].update(type="mrkdwn"), "header text must be plain_text"),
    (lambda p: p["blocks"][2].update(elements=[{"type": "mrkdwn", "text": "n"}] * 11), "11 elements; at most 10"),
    (lambda p: at(p, BUTTON[:3]).extend(copy.deepcopy(at(p, BUTTON)) | {"action_id": f"a{i}"} for i in range(25)),
     "26 elements; at most 25"),
    (lambda p: at(p, BUTTON[:3]).append(copy.deepcopy(at(p, BUTTON))), "action_id 'gpuherd:stop:1' is used twice"),
    (lambda p: at(p, BUTTON).update(action_id="a" * 256), "action_id is 256 characters; at most 255"),
    (lambda p: p["blocks"][1].update(block_id="b" * 256), "block_id is 256 characters; at most 255"),
    (lambda p: [b.update(block_id="same") for b in p["blocks"][:2]], "block_id 'same' is used twice"),
    (lambda p: at(p, BUTTON).update(style="default"), "button style 'default'"),
    (lambda p: at(p, BUTTON)["text"].update(text="x" * 76), "button text is 76 characters; at most 75"),
    (lambda p: at(p, BUTTON).update(value="v" * 2001), "button value is 2,001 characters; at most 2,000"),
    (lambda p: at(p, BUTTON).update(url="https://x/" + "u" * 2991), "button url is 3,001 characters"),
    (lambda p: at(p, BUTTON)["confirm"]["title"].update(text="x" * 101), "title is 101 characters; at most 100"),
    (lambda p: at(p, BUTTON)["confirm"]["text"].update(text="x" * 301), "text is 301 characters; at most 300"),
    (lambda p: at(p, BUTTON)["confirm"]["confirm"].update(text="x" * 31), "confirm is 31 characters; at most 30"),
    (lambda p: at(p, BUTTON)["confirm"]["deny"].update(text="x" * 31), "deny is 31 characters; at most 30"),
    (lambda p: at(p, BUTTON)["confirm"].update(style="warning"), "style 'warning'"),
    (lambda p: at(p, BUTTON)["confirm"].pop("deny"), "deny is missing"),
    (lambda p: p.pop("text"), "top-level text (the notification fallback) is missing or empty"),
    (lambda p: p.update(text="  "), "top-level text (the notification fallback) is missing or empty"),
    (lambda p: p.update(text="t" * 40_001), "top-level text is 40,001 characters; at most 40,000"),
    (lambda p: p["blocks"][1]["text"].update(text=""), "section text is empty"),
    (lambda p: p["blocks"][1].pop("text") and p["blocks"][1].pop("fields"), "a section needs text or fields"),
    (lambda p: p["blocks"].extend({"type": "section", "text": {"type": "mrkdwn", "text": "x" * 2900}} for _ in range(5)),
     "characters of text in all"),
    (lambda p: p["blocks"].append({"type": "bogus"}), "unknown block type 'bogus'"),
])
def test_violations_catch_each_limit(change: Any, fragment: str) -> None:
    assert violations(good()) == []
    problems = broken(change)
    assert any(fragment in p for p in problems), problems


def test_violations_for_a_home_view() -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}} for _ in range(60)]
    assert violations({"type": "home", "blocks": blocks}, home=True) == []
    assert any("60 blocks; at most 50" in p for p in violations({"text": "t", "blocks": blocks}))
    assert any("101 blocks; at most 100" in p
               for p in violations({"type": "home", "blocks": blocks + blocks[:41]}, home=True))
    assert any("not 'home'" in p for p in violations({"type": "modal", "blocks": blocks}, home=True))
    assert violations({"type": "home", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "y" * 2900}}] * 10},
                      home=True) == []        # the cumulative text limit is chat.postMessage's, not views.publish's


# --- every reply the suite can produce --------------------------------------------------------------

# (who, line, expected level class); {run}, {stopped}, {stranger}, {yes}, {no}, {destroy_yes} are filled in
# from earlier replies. "ok" = not an error, "error" = an error reply, "any" = either.
SCRIPT: list[tuple[str, str, str]] = [
    ("admin", "/gpu", "ok"),
    ("admin", "/gpu help", "ok"),
    *[("admin", f"/gpu help {c.name}", "ok") for c in REGISTRY.all()],
    ("admin", "/gpu help frobnicate", "error"),
    ("admin", "/gpu bot budget", "error"),
    ("admin", "/gpu search 4090 <$0.5 limit=3", "ok"),
    ("admin", "/gpu search limit=50", "ok"),
    ("admin", "/gpu search gpu_ram>>24", "error"),
    ("admin", "/gpu templates", "ok"),
    ("admin", "/gpu templates research", "ok"),
    ("admin", "/gpu template llava-34b", "ok"),
    ("admin", "/gpu templates nonesuch", "error"),
    ("admin", "/gpu boot budget idle=45m", "ok"),
    ("admin", "/gpu boot research", "ok"),
    ("admin", "/gpu boot high_performance", "ok"),
    ("admin", "/gpu boot llava-34b", "ok"),
    ("admin", "/gpu boot llama-3.1-70b", "any"),
    ("admin", "/gpu boot", "error"),
    ("admin", "/gpu boot nonesuch", "error"),
    ("admin", "/gpu boot budget idle=soon", "error"),
    ("admin", "/gpu boot budget max_dph=0.01", "ok"),          # a price question: {yes} and {no}
    ("admin", "/gpu cancel {no}", "ok"),
    ("admin", "/gpu boot budget max_dph=0.01", "ok"),
    ("admin", "/gpu confirm {yes}", "ok"),
    ("admin", "/gpu confirm {yes}", "ok"),                    # the same yes again: the first answer
    ("admin", "/gpu confirm", "error"),
    ("admin", "/gpu confirm c_nosuchtoken00000000000", "error"),
    ("admin", "/gpu cancel", "error"),
    ("admin", "/gpu cancel c_nosuchtoken00000000000", "error"),
    ("admin", "/gpu status", "ok"),
    ("admin", "/gpu status {run}", "ok"),
    ("admin", "/gpu list all=yes", "ok"),
    ("admin", "/gpu status --guards", "ok"),
    ("admin", "/gpu status bogus=1", "error"),
    ("admin", "/gpu status {run} extra", "error"),
    ("admin", "/gpu guards", "ok"),
    ("admin", "/gpu guards now", "error"),
    ("admin", "/gpu keep {run} 2h", "ok"),
    ("admin", "/gpu keep", "error"),
    ("admin", "/gpu keep {run} forever", "error"),
    ("admin", "/gpu stop {stopped}", "ok"),
    ("admin", "/gpu stop {stopped}", "error"),
    ("admin", "/gpu stop", "error"),
    ("admin", "/gpu start {stopped}", "ok"),
    ("admin", "/gpu stop {stopped}", "ok"),
    ("admin", "/gpu start {run}", "error"),
    ("admin", "/gpu costs", "ok"),
    ("admin", "/gpu costs week by=template", "ok"),
    ("admin", "/gpu cost month by=user", "ok"),
    ("admin", "/gpu costs {run}", "ok"),
    ("admin", "/gpu costs fortnight", "error"),
    ("admin", "/gpu audit", "ok"),
    ("admin", "/gpu audit 200 {run}", "ok"),
    ("admin", "/gpu audit many", "error"),
    ("admin", "/gpu budget", "ok"),
    ("admin", "/gpu budget set team=ml 500 hard_cap=yes", "ok"),
    ("admin", "/gpu budget set user=slack:U2 100", "ok"),
    ("admin", "/gpu budget", "ok"),
    ("admin", "/gpu budget clear team=ml", "ok"),
    ("admin", "/gpu budget raise team=ml 500", "error"),
    ("admin", "/gpu reconcile", "ok"),
    ("admin", "/gpu reconcile now", "error"),
    ("admin", "/gpu providers", "ok"),
    ("admin", "/gpu providers now", "error"),
    ("admin", "/gpu attach sandbox:{stranger} idle=2h owner=slack:U2", "ok"),
    ("admin", "/gpu attach", "error"),
    ("admin", "/gpu attach sandbox:nosuch", "error"),
    ("member", "/gpu boot budget", "ok"),
    ("member", "/gpu status", "ok"),
    ("member", "/gpu stop {run}", "error"),
    ("member", "/gpu audit", "error"),
    ("member", "/gpu budget set team=ml 5", "error"),
    ("admin", "/gpu destroy {run}", "ok"),                     # the destroy question: {destroy_yes}
    ("admin", "/gpu confirm {destroy_yes}", "ok"),
    ("admin", "/gpu destroy {run} confirm=yes", "error"),
    ("admin", "/gpu destroy", "error"),
    ("admin", "/gpu destroy {stopped} confirm=yes", "ok"),
    ("admin", "/gpu status all=yes", "ok"),
]


def remember(line: str, reply: Reply, values: dict[str, str]) -> None:
    """What a reply of the script tells its later lines: the machines it booted, the tokens of
    the questions it asked."""
    if reply.title.startswith("Booted g-") and "run" not in values:
        values["run"] = reply.title.split()[1]
    elif reply.title.startswith("Booted g-") and "stopped" not in values:
        values["stopped"] = reply.title.split()[1]
    if reply.confirmation is not None:
        token = reply.confirmation.command.split()[-1]
        cancel = next(a for a in reply.actions if a.command.startswith("/gpu cancel "))
        if line.startswith("/gpu destroy"):
            values["destroy_yes"] = token
        else:
            values["yes"], values["no"] = token, cancel.command.split()[-1]


def command_of(line: str) -> str | None:
    words = grammar.strip_prefix(line).split()
    try:
        return REGISTRY.find(words[0]).name if words else "help"
    except Exception:
        return None


def test_the_script_covers_every_command() -> None:
    names = {c.name for c in REGISTRY.all()}
    helped = {line.split()[2] for _, line, _ in SCRIPT if line.startswith("/gpu help ") and len(line.split()) == 3}
    used = {command_of(line) for _, line, expect in SCRIPT if expect == "ok"} - {None}
    refused = {command_of(line) for _, line, expect in SCRIPT if expect == "error"} - {None}
    assert helped >= names, f"no /gpu help for {names - helped}"
    assert used == names, f"never used: {names - used}"
    assert refused == names, f"never given bad input: {names - refused}"


def synthetic_extremes() -> list[Reply]:
    long_actions = [Action(label=f"Act {i} " + "w" * 90, command=f"/gpu stop g-{i:04d}", ref=f"stop|g-{i:04d}",
                           style="danger" if i % 3 == 0 else "primary" if i % 3 == 1 else "default",
                           confirm=Confirm(title="T" * 150, text="Z" * 400, yes="Y" * 50, no="N" * 50) if i % 2 else None)
                    for i in range(30)]
    nasty = ["```", "`", "<@U1>", "&", "<!channel>", "slack:U0ABC", "a\nb", "x" * 300]
    return [
        Reply(title="Long text", text="t" * 10_000),
        Reply(title="Long words & lines", text=("&<>" * 1000 + "\n") * 5),
        Reply(title="Forty fields", fields=[ReplyField(label=f"field {i} <@U1>", value="v & <!channel> " * (i * 20),
                                                       inline=i % 7 != 0) for i in range(40)]),
        Reply(title="Thirty actions", actions=long_actions),
        Reply(title="Twenty notes", notes=[f"note {i} " + "n" * (i * 60) for i in range(20)]),
        Reply(title="Nasty cells", tables=[Table(columns=nasty, rows=[nasty] * 200, caption="```<!here>``` " * 40)]),
        Reply(title="Many columns", tables=[Table(columns=[f"c{i}" for i in range(60)],
                                                  rows=[["&" * 40] * 60 for _ in range(30)])]),
        Reply(title="Empty table", tables=[Table(columns=["a", "b"], rows=[])]),
        Reply(title="Ragged", tables=[Table(columns=["a"], rows=[["1", "2", "3"], []])]),
        Reply(title="", text=""),
        Reply(title="Everything at once " * 20, level="error", text="e" * 10_000,
              fields=[ReplyField(label=f"f{i}", value="v" * 1500) for i in range(40)],
              tables=[wide_table(700), Table(columns=nasty, rows=[nasty] * 50)],
              actions=long_actions, notes=[f"note {i}" for i in range(20)],
              confirmation=long_actions[1]),
    ]


# a renderer test: the replies do not depend on the database, so SQLite only (suite time)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_every_reply_the_suite_can_produce_renders_within_the_limits(
        service: GpuService, sandbox: SandboxProvider, admin: Actor, member: Actor) -> None:
    actors = {"admin": admin, "member": member}
    values: dict[str, str] = {}
    rendered: list[tuple[str, Reply]] = []
    problems: list[str] = []
    offer = min(await sandbox.search(), key=lambda o: o.dph)
    values["stranger"] = (await sandbox.create(CreateRequest(offer_id=offer.offer_id, label="by-hand", image="x/y:1"))).provider_id
    for _ in range(30):                     # a status with many instances
        r = await dispatch(Context(service=service, actor=admin, wait=False), "/gpu boot budget")
        assert r.level == "success", r.text
    used: set[str] = set()
    refused: set[str] = set()
    for who, template, expect in SCRIPT:
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
    names = {c.name for c in REGISTRY.all()}
    assert used == names and refused == names

    status = await service.status(admin, include_ended=True)
    assert status.total >= 30
    many = status.model_copy(update={"instances": [v.model_copy(update={"id": f"g-{i:08x}", "owner": f"slack:U{i:05d}X"})
                                                   for i in range(600) for v in status.instances[:1]], "total": 600})
    rendered.append(("600 instances", replies.status_reply(many)))
    rendered += [(f"synthetic {r.title[:30]!r}", r) for r in synthetic_extremes()]

    kinds = {"confirmation": 0, "paged": 0, "buttons": 0}
    for what, reply in rendered:
        pages = render(reply, {"slack:U2": "bob"})
        for i, page in enumerate(pages):
            found = violations(page.payload())
            if found:
                problems.append(f"{what} page {i + 1}/{len(pages)}: {found}")
        if reply.confirmation is not None:
            kinds["confirmation"] += 1
            yes = next(b for b in buttons(pages[-1]) if b["value"] == reply.confirmation.ref)
            dialog = yes["confirm"]["text"]["text"]
            for sentence in re.split(r"(?<=[.?!])\s+", reply.text):
                if "$" in sentence and len(reply.text) <= limits.CONFIRM_TEXT:
                    assert sentence in dialog, (what, dialog)
            if "a day" in reply.text:           # the price question: per hour, day and month in the dialog
                assert "/h" in dialog and "a day" in dialog and "a month" in dialog, dialog
        kinds["paged"] += len(pages) > 1
        kinds["buttons"] += any(buttons(p) for p in pages)
        if reply.tables:                         # no row is lost however many pages it takes
            shown = "\n".join(t for p in pages for k, t in texts(p.blocks) if k == "mrkdwn")
            for table in reply.tables[:1]:
                for row in table.rows[:: max(1, len(table.rows) // 50)]:
                    first = row[0].replace("`", "ˋ") if row else ""
                    if first and len(first) <= 40 and not any(c in first for c in "<>&\n") and "slack:" not in first:
                        assert first in shown, (what, first)
    assert not problems, "\n".join(problems)
    assert kinds["confirmation"] >= 4 and kinds["paged"] >= 3 and kinds["buttons"] >= 10, kinds

    parts = [replies.status_reply(await service.status(admin)), replies.costs_reply(await service.costs(admin)),
             replies.status_reply(many), rendered[0][1]]
    for combo in (parts[:2], parts, [replies.error("No access.", title="Your machines"), parts[1]]):
        view = render_home(combo, {"slack:U2": "bob"})
        assert violations(view, home=True) == [], violations(view, home=True)
        assert view["type"] == "home" and len(view["blocks"]) <= limits.BLOCKS_PER_VIEW


def test_page_fallback_texts_are_never_empty_and_clipped() -> None:
    (page,) = render(Reply(title="", text=""))
    assert page.text == "gpuherd" and page.blocks[0]["text"]["text"] == "gpuherd"
    (page,) = render(Reply(title="Hi", text="\n\n  first line\nsecond"))
    assert page.text == "Hi: first line"
    pages = render(Reply(title="T", text="&" * 5000))
    all_ok(pages)
    assert len(pages[0].text) <= 1000 and pages[0].text.endswith("&amp;…")

