"""The notebook renderer of the platform-neutral Reply (notebook_ext/render_html.py).

Unit tests pin each rule (escaping, tables and their alignment, fields, notes, buttons and
their rows, styles, the inline question, the static fallback); then every reply of the scripted
session of tests/test_slack_blocks.py (every registered command: its help, a typical use, bad
input) plus its synthetic extremes is rendered with `reply_html` and `reply_widget`. The HTML is
parsed as XML: an unescaped `<` or `&` from a user, a template or a provider breaks the parse."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import ipywidgets as w
import pytest

from gpuherd.bot import replies
from gpuherd.bot.grammar import REGISTRY, Context, dispatch
from gpuherd.bot.replies import Action, Reply, ReplyField, Table
from gpuherd.core.actions import Action as CoreAction
from gpuherd.core.actions import Op, Style
from gpuherd.core.auth import Actor
from gpuherd.core.providers.base import CreateRequest
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.service import GpuService
from gpuherd.notebook_ext.render_html import PER_ROW, RichReply, button_actions, reply_html, reply_widget
from tests.test_slack_blocks import SCRIPT, command_of, price_confirmation, remember, synthetic_extremes

EVIL = "<script>alert('x')</script> & \"q\""
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def parse(fragment: str) -> ET.Element:
    return ET.fromstring(fragment)


def by_class(root: ET.Element, name: str) -> list[ET.Element]:
    return [e for e in root.iter() if name in (e.get("class") or "").split()]


def body_rows(table: ET.Element) -> list[ET.Element]:
    tbody = table.find("tbody")
    assert tbody is not None
    return list(tbody.findall("tr"))


def text_of(e: ET.Element) -> str:
    return "".join(e.itertext())


def destroy_actions(iid: str = "g-7f3a") -> list[Action]:
    return [replies.phrase(CoreAction(op=Op.KEEP, instance_id=iid, args={"duration": "1h"})),
            replies.phrase(CoreAction(op=Op.STOP, instance_id=iid, style=Style.PRIMARY)),
            replies.phrase(CoreAction(op=Op.DESTROY, instance_id=iid, style=Style.DANGER, confirm=True))]


# --- the HTML -------------------------------------------------------------------------------------

def test_everything_user_supplied_is_escaped() -> None:
    reply = Reply(title=EVIL, text=f"line one\n{EVIL}", level="error",
                  fields=[ReplyField(label=EVIL, value=EVIL), ReplyField(label="wide", value="x", inline=False)],
                  tables=[Table(columns=[EVIL, "n"], rows=[[EVIL, "1"]], caption=EVIL)],
                  actions=[Action(label=EVIL, command=f"/gpu templates {EVIL}")], notes=[EVIL])
    for fragment in (reply_html(reply), reply_html(reply, commands=True), RichReply(reply)._repr_html_()):
        assert "<script" not in fragment and "&lt;script&gt;" in fragment
        root = parse(fragment)                    # well-formed: nothing unescaped broke out
        assert text_of(by_class(root, "gpuherd-title")[0]) == EVIL
        assert text_of(by_class(root, "gpuherd-text")[0]) == f"line one\n{EVIL}"     # newlines kept
        assert [text_of(e) for e in root.iter("dt")] == [EVIL, "wide"]
        assert text_of(by_class(root, "gpuherd-notes")[0]) == EVIL
        (table,) = root.iter("table")
        assert text_of(table.find("caption")) == EVIL and text_of(body_rows(table)[0]) == EVIL + "1"
        (commands,) = by_class(root, "gpuherd-commands")      # an action with no ref: its /gpu line
        assert f"/gpu templates {EVIL}" in text_of(commands)


def test_title_is_coloured_by_level_and_notes_are_muted() -> None:
    colours = set()
    for level in ("info", "success", "warning", "error"):
        root = parse(reply_html(Reply(title="T", level=level, notes=["Simulated: sandbox provider"])))
        assert root.get("data-level") == level and f"gpuherd-{level}" in root.get("class", "")
        title = by_class(root, "gpuherd-title")[0]
        colours.add(title.get("style"))
        note = by_class(root, "gpuherd-notes")[0]
        assert "color:#6e7781" in (note.get("style") or "") and "font-size:0.85em" in (note.get("style") or "")
    assert len(colours) == 4


def test_tables_become_html_tables_right_aligned_where_align_says() -> None:
    t = Table(columns=["id", "cost"], rows=[["g-1", "$1.00"], ["g-2", "$10.00"], ["g-3", "$0"]], align=["left", "right"])
    ragged = Table(columns=["a"], rows=[["1", "2", "3"], []])
    root = parse(reply_html(Reply(title="t", tables=[t, ragged, Table(columns=["x"], rows=[])])))
    tables = list(root.iter("table"))
    assert len(tables) == 3 and all("gpuherd-table" in (x.get("class") or "") for x in tables)
    first = tables[0]
    assert [text_of(th) for th in first.find("thead").iter("th")] == ["id", "cost"]
    rows = body_rows(first)
    assert len(rows) == 3
    for row in rows:
        left, right = row.findall("td")
        assert "text-align:left" in left.get("style", "") and "text-align:right" in right.get("style", "")
    assert [text_of(td) for td in rows[1]] == ["g-2", "$10.00"]
    # a ragged row loses no cell, a short one is padded
    assert [len(r.findall("td")) for r in body_rows(tables[1])] == [3, 3]
    assert body_rows(tables[2]) == []
    # a long table scrolls inside its output
    long = reply_html(Reply(title="t", tables=[Table(columns=["n"], rows=[[str(i)] for i in range(100)])]))
    assert "max-height:32em" in long and len(body_rows(next(parse(long).iter("table")))) == 100


def test_fields_are_a_definition_grid_and_wide_ones_span_it() -> None:
    root = parse(reply_html(Reply(title="t", fields=[ReplyField(label="state", value="running"),
                                                     ReplyField(label="guards", value="idle armed", inline=False)])))
    (grid,) = root.iter("dl")
    assert "display:grid" in grid.get("style", "")
    assert [(text_of(dt), text_of(dd)) for dt, dd in zip(grid.iter("dt"), grid.iter("dd"), strict=True)] \
        == [("state", "running"), ("guards", "idle armed")]
    narrow, wide = grid.iter("dd")
    assert "grid-column:1 / -1" in wide.get("style", "") and "grid-column" not in narrow.get("style", "")


# --- the widget ------------------------------------------------------------------------------------

def test_buttons_are_the_actions_with_styles_and_no_icons() -> None:
    pressed: list[Action] = []
    actions = destroy_actions()
    view = reply_widget(Reply(title="g-7f3a", actions=actions), pressed.append)
    buttons = view.buttons
    assert [b.description for b in buttons] == ["Keep 1 h", "Stop", "Destroy"]
    assert [b.button_style for b in buttons] == ["", "primary", "danger"]
    assert all(b.icon == "" and not b.disabled for b in buttons)
    assert [b.tooltip for b in buttons] == [a.command for a in actions]
    assert isinstance(view.children[0], w.HTML) and "g-7f3a" in view.children[0].value
    buttons[1].click()
    assert pressed == [actions[1]]


def test_a_destructive_action_asks_inline_before_it_is_pressed() -> None:
    pressed: list[Action] = []
    actions = destroy_actions()
    view = reply_widget(Reply(title="g-7f3a", actions=actions), pressed.append)
    destroy = view.buttons[2]
    assert view.confirm_box.layout.display == "none"
    destroy.click()
    assert pressed == [] and view.confirm_box.layout.display == "flex"
    prompt = view.confirm_box.children[0].value
    assert "Destroy?" in prompt and "Destroy g-7f3a: this cannot be undone." in prompt
    assert view.confirm_yes.description == "Destroy" and view.confirm_yes.button_style == "danger"
    assert view.confirm_no.description == "Cancel" and view.confirm_yes.icon == view.confirm_no.icon == ""
    view.confirm_no.click()
    assert pressed == [] and view.confirm_box.layout.display == "none"
    destroy.click()
    view.confirm_yes.click()
    assert pressed == [actions[2]] and view.confirm_box.layout.display == "none"
    view.confirm_yes.click()                       # the question was answered: a second yes sends nothing
    assert pressed == [actions[2]]


def test_the_yes_of_cores_own_question_is_not_asked_again() -> None:
    reply = price_confirmation()
    pressed: list[Action] = []
    view = reply_widget(reply, pressed.append)
    yes, no = view.buttons
    assert (yes.description, yes.button_style, no.description) == ("Boot anyway", "primary", "Cancel")
    yes.click()
    assert pressed == [reply.actions[0]] and view.confirm_box.layout.display == "none"
    # a builder that left its yes out of the actions still gets the button
    lone = Reply(title="Sure?", confirmation=Action(label="Yes", command="/gpu confirm c_1", ref="confirm||c_1"))
    assert [a.ref for a in button_actions(lone)] == ["confirm||c_1"]


def test_at_most_five_buttons_a_row_and_actions_without_ref_are_commands() -> None:
    actions = [Action(label=f"Stop g-{i}", command=f"/gpu stop g-{i}", ref=f"stop|g-{i}") for i in range(12)]
    actions.append(Action(label="Details", command="/gpu templates research"))
    view = reply_widget(Reply(title="t", actions=actions), lambda a: None)
    rows = [c for c in view.children if isinstance(c, w.HBox) and "gpuherd-actions" in c._dom_classes]
    assert [len(r.children) for r in rows] == [PER_ROW, PER_ROW, 2]
    assert [b.description for r in rows for b in r.children] == [f"Stop g-{i}" for i in range(12)]
    assert "/gpu templates research" in view.children[0].value


def test_without_a_press_callback_buttons_are_shown_disabled() -> None:
    view = reply_widget(Reply(title="t", actions=destroy_actions()), None)
    assert view.buttons and all(b.disabled for b in view.buttons)


def test_rich_reply_bundles_the_widget_with_an_html_and_text_fallback() -> None:
    live = RichReply(Reply(title="g-7f3a", actions=destroy_actions()), lambda a: None)
    bundle = live._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"] == live.widget.model_id
    assert "gpuherd-reply" in bundle["text/html"] and "/gpu destroy g-7f3a" in bundle["text/html"]
    assert bundle["text/plain"].startswith("g-7f3a")
    static = RichReply(Reply(title="Templates", tables=[Table(columns=["name"], rows=[["budget"]])]))
    assert set(static._repr_mimebundle_()) == {"text/html", "text/plain"}
    assert "budget" in static._repr_mimebundle_()["text/plain"]


# --- every reply the suite can produce --------------------------------------------------------------

EVIL_LINES: list[tuple[str, str, str]] = [
    ("admin", f"/gpu templates {EVIL.split()[0]}", "error"),
    ("admin", f"/gpu boot \"{EVIL}\"", "error"),
    ("admin", "/gpu search gpu_name=<script>", "any"),
    ("admin", "/gpu search <script>", "any"),
]


def check_rendering(what: str, reply: Reply) -> list[str]:
    problems: list[str] = []
    fragment = reply_html(reply)
    try:
        root = parse(fragment)
    except ET.ParseError as exc:
        return [f"{what}: not well-formed ({exc})"]
    if "<script" in fragment:
        problems.append(f"{what}: an unescaped <script>")
    tables = list(root.iter("table"))
    if len(tables) != len(reply.tables):
        problems.append(f"{what}: {len(tables)} tables for {len(reply.tables)}")
    for table, source in zip(tables, reply.tables, strict=False):
        if len(body_rows(table)) != len(source.rows):
            problems.append(f"{what}: {len(body_rows(table))} rows for {len(source.rows)}")
    if reply.title and text_of(by_class(root, "gpuherd-title")[0]) != reply.title:
        problems.append(f"{what}: title changed")
    view = reply_widget(reply, lambda a: None)
    expected = [a for a in reply.actions if a.ref]
    if reply.confirmation is not None and all(a.ref != reply.confirmation.ref for a in expected):
        expected.append(reply.confirmation)
    if [b.description for b in view.buttons] != [a.label for a in expected]:
        problems.append(f"{what}: buttons {[b.description for b in view.buttons]} for {[a.label for a in expected]}")
    for b, a in zip(view.buttons, expected, strict=False):
        if b.icon:
            problems.append(f"{what}: button {b.description!r} has an icon")
        if b.button_style != {"default": ""}.get(a.style, a.style):
            problems.append(f"{what}: button {b.description!r} is {b.button_style!r}, not {a.style!r}")
    if any(len(row.children) > PER_ROW for row in view.children if isinstance(row, w.HBox)
           and "gpuherd-actions" in row._dom_classes):
        problems.append(f"{what}: more than {PER_ROW} buttons in a row")
    static = RichReply(reply)._repr_html_()
    for a in reply.actions:
        if a.command and a.command.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") not in static:
            problems.append(f"{what}: the static HTML does not say {a.command!r}")
    return problems


# a renderer test: the replies do not depend on the database, so SQLite only (suite time)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_every_reply_of_the_scripted_session_renders(service: GpuService, sandbox: SandboxProvider,
                                                           admin: Actor, member: Actor) -> None:
    actors = {"admin": admin, "member": member}
    values: dict[str, str] = {}
    offer = min(await sandbox.search(), key=lambda o: o.dph)
    values["stranger"] = (await sandbox.create(CreateRequest(offer_id=offer.offer_id, label="by-hand",
                                                             image="x/y:1"))).provider_id
    rendered: list[tuple[str, Reply]] = []
    used: set[str] = set()
    for who, template, expect in [*SCRIPT, *EVIL_LINES]:
        line = template.format(**values)
        reply = await dispatch(Context(service=service, actor=actors[who], wait=True), line)
        rendered.append((line, reply))
        assert expect == "any" or (reply.level == "error") == (expect == "error"), (line, reply.title, reply.text)
        name = command_of(line)
        if name and reply.level != "error":
            used.add(name)
        remember(line, reply, values)
    assert used == {c.name for c in REGISTRY.all()}
    rendered += [(f"synthetic {r.title[:30]!r}", r) for r in synthetic_extremes()]

    problems = [p for what, reply in rendered for p in check_rendering(what, reply)]
    assert not problems, "\n".join(problems)

    # the user's own <script> really went through a reply, and came out escaped
    echoed = [(line, r) for line, r in rendered if "<script>" in (r.title + r.text + str(r.fields) + str(r.tables))]
    assert echoed, "no reply echoed the <script> input: the escaping was not exercised"
    for _, r in echoed:
        fragment = reply_html(r)
        assert "&lt;script&gt;" in fragment and "<script" not in fragment
    # destroy is a danger button that asks inline; every kind of reply came through
    destroys = [b for _, r in rendered for b, a in zip(reply_widget(r, lambda a: None).buttons, button_actions(r),
                                                       strict=True) if a.command.startswith("/gpu destroy ")]
    assert destroys and all(b.button_style == "danger" for b in destroys)
    kinds = {"tables": sum(bool(r.tables) for _, r in rendered), "buttons": sum(bool(button_actions(r)) for _, r in rendered),
             "questions": sum(r.confirmation is not None for _, r in rendered),
             "errors": sum(r.level == "error" for _, r in rendered)}
    assert kinds["tables"] >= 10 and kinds["buttons"] >= 10 and kinds["questions"] >= 3 and kinds["errors"] >= 20, kinds
