"""A platform-neutral `Reply` (bot/replies.py) in a notebook: HTML for any viewer, and an
ipywidgets view with the reply's buttons for a live kernel.

    reply_html(reply)                 -> str: title, text, fields, tables, notes; everything escaped
    reply_widget(reply, press)        -> VBox: that HTML, rows of Buttons for reply.actions, an inline Yes/No
    RichReply(reply, press)           -> what `display()` shows: the widget in a live front end, the HTML
                                         (and plain text) everywhere else (nbclient outputs, nbviewer, GitHub)

Decisions:
- Everything a user, a template or a provider wrote (titles, names, queries, cells, notes,
  button words) goes through `html.escape`; the only markup is ours. Styles are inline (no
  external CSS, no CDN, no `Button(icon=...)`: Voila and offline front ends show blank icons).
- Element conventions (for tests and for a stylesheet a user may add): the root is
  `div.gpuherd-reply.gpuherd-<level>` with `data-level`; inside it `div.gpuherd-title`,
  `div.gpuherd-text`, `dl.gpuherd-fields` (`dt`/`dd`; a field that is not inline spans the row),
  `table.gpuherd-table` (one per Reply table; `thead` holds the header row, `tbody` one `tr` per
  row; a right-aligned column has `style="text-align:right"` on its cells), `div.gpuherd-commands`
  (actions as /gpu lines, static HTML only) and `div.gpuherd-notes` (the muted footer). Widgets get
  the classes `gpuherd-reply-widget`, `gpuherd-actions` (an HBox of at most five buttons),
  `gpuherd-action` (each button) and `gpuherd-confirm` (the inline question).
- Buttons are the reply's actions, as core offered them, in order (plus `reply.confirmation` if a
  builder left it out of the actions, as Slack's renderer does). An action without a `ref` cannot
  be pressed: its /gpu line is shown instead. Without a `press` callback the buttons are shown
  disabled (what would be offered, nothing to send it to).
- An action with `confirm` asks its Yes/No inline before `press` is called, so `press` may treat
  it as confirmed (as Slack's dialog does). The yes of core's own question (`reply.confirmation`,
  a price or destroy question with its cost) is not asked again: the reply is the question.
- The widget view is only built when it has something live to show (buttons, or widgets the
  caller puts below); a reply without actions is plain HTML, which survives a kernel restart."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gpuherd.bot.replies import Action, Reply, Table

if TYPE_CHECKING:
    import ipywidgets

Press = Callable[[Action], None]
PER_ROW = 5
SCROLL_ROWS = 25                  # a longer table scrolls inside the output instead of filling the page
COLOURS = {"info": "#0969da", "success": "#1a7f37", "warning": "#9a6700", "error": "#cf222e"}
MUTED = "#6e7781"
BUTTON_STYLE = {"default": "", "primary": "primary", "danger": "danger"}


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _table(t: Table) -> str:
    right = [bool(t.align and i < len(t.align) and t.align[i] == "right") for i in range(len(t.columns))]
    width = max([len(t.columns), *(len(r) for r in t.rows)]) if t.rows else len(t.columns)

    def cell(tag: str, i: int, value: str) -> str:
        style = "text-align:right;" if i < len(right) and right[i] else "text-align:left;"
        return f'<{tag} style="{style}padding:2px 8px;">{_e(value)}</{tag}>'

    head = "".join(cell("th", i, c) for i, c in enumerate(t.columns))
    body = "".join("<tr>" + "".join(cell("td", i, row[i] if i < len(row) else "") for i in range(width)) + "</tr>"
                   for row in t.rows)
    caption = (f'<caption style="caption-side:top;text-align:left;font-weight:600;">{_e(t.caption)}</caption>'
               if t.caption else "")
    scroll = "max-height:32em;overflow-y:auto;" if len(t.rows) > SCROLL_ROWS else ""
    return (f'<div style="overflow-x:auto;{scroll}margin:4px 0;"><table class="gpuherd-table" '
            f'style="border-collapse:collapse;font-variant-numeric:tabular-nums;">{caption}'
            f'<thead><tr style="border-bottom:1px solid {MUTED};">{head}</tr></thead><tbody>{body}</tbody>'
            f"</table></div>")


def reply_html(reply: Reply, *, commands: bool = False) -> str:
    """The reply as one HTML fragment. `commands`: also list the actions as /gpu lines (for a
    static viewer, where buttons cannot be pressed)."""
    colour = COLOURS.get(reply.level, COLOURS["info"])
    parts = [f'<div class="gpuherd-reply gpuherd-{_e(reply.level)}" data-level="{_e(reply.level)}" '
             f'style="border-left:3px solid {colour};padding:2px 0 2px 10px;margin:2px 0;">']
    if reply.title:
        parts.append(f'<div class="gpuherd-title" style="color:{colour};font-weight:600;">{_e(reply.title)}</div>')
    if reply.text:
        parts.append(f'<div class="gpuherd-text" style="white-space:pre-wrap;margin:2px 0;">{_e(reply.text)}</div>')
    if reply.fields:
        items = []
        for f in reply.fields:
            span = "" if f.inline else "grid-column:1 / -1;"
            label = f'<dt style="color:{MUTED};margin:0;{span}">{_e(f.label)}</dt>'
            value = f'<dd style="margin:0;white-space:pre-wrap;{span}">{_e(f.value)}</dd>'
            items.append(label + value)
        parts.append('<dl class="gpuherd-fields" style="display:grid;grid-template-columns:max-content auto;'
                     'column-gap:12px;row-gap:1px;margin:4px 0;">' + "".join(items) + "</dl>")
    parts += [_table(t) for t in reply.tables]
    shown = [a for a in reply.actions if commands or not a.ref]
    if shown:
        lines = "".join(f"<li>{_e(a.label)}: <code>{_e(a.command)}</code></li>" for a in shown)
        parts.append(f'<div class="gpuherd-commands" style="margin:4px 0;"><ul style="margin:0;padding-left:18px;">'
                     f"{lines}</ul></div>")
    if reply.notes:
        notes = "".join(f"<div>{_e(n)}</div>" for n in reply.notes)
        parts.append(f'<div class="gpuherd-notes" style="color:{MUTED};font-size:0.85em;margin-top:4px;">{notes}</div>')
    parts.append("</div>")
    return "".join(parts)


def button_actions(reply: Reply) -> list[Action]:
    """The actions that become buttons: those with a ref, and the question's yes if it is missing."""
    actions = [a for a in reply.actions if a.ref]
    if reply.confirmation is not None and reply.confirmation.ref and all(
            a.ref != reply.confirmation.ref for a in actions):
        actions.append(reply.confirmation)
    return actions


def reply_widget(reply: Reply, press: Press | None = None, *,
                 below: Sequence[ipywidgets.Widget] = ()) -> ipywidgets.VBox:
    """The HTML in an `HTML` widget, a row of Buttons per five actions, the inline question an
    action with `confirm` asks, then `below` (the caller's progress bar, its answers' Output).
    The buttons are in `.buttons` (in order, one per `button_actions(reply)`)."""
    import ipywidgets as w

    actions = button_actions(reply)
    body = w.HTML(value=reply_html(reply))
    prompt = w.HTML(value="")
    yes = w.Button(description="Yes", layout=w.Layout(width="auto"))
    no = w.Button(description="Cancel", layout=w.Layout(width="auto"))
    for b in (yes, no):
        b.add_class("gpuherd-action")
    ask = w.HBox([prompt, yes, no], layout=w.Layout(display="none", align_items="center"))
    ask.add_class("gpuherd-confirm")
    asking: list[Action] = []          # the action the inline question is about (at most one)

    def send(action: Action) -> None:
        if press is not None:
            press(action)

    def on_yes(_: Any) -> None:
        ask.layout.display = "none"
        if asking:
            send(asking.pop())

    def on_no(_: Any) -> None:
        ask.layout.display = "none"
        asking.clear()

    yes.on_click(on_yes)
    no.on_click(on_no)

    def clicked(action: Action) -> Callable[[Any], None]:
        question = action.confirm
        is_the_question = reply.confirmation is not None and action.ref == reply.confirmation.ref

        def handler(_: Any) -> None:
            if question is None or is_the_question:
                send(action)
                return
            asking[:] = [action]
            prompt.value = (f'<span style="margin-right:8px;"><b>{_e(question.title)}</b> '
                            f"{_e(question.text)}</span>")
            yes.description = question.yes or "Yes"
            yes.button_style = BUTTON_STYLE.get(action.style, "")
            no.description = question.no or "Cancel"
            ask.layout.display = "flex"
        return handler

    buttons = []
    for action in actions:
        b = w.Button(description=action.label, button_style=BUTTON_STYLE.get(action.style, ""),
                     tooltip=action.command, disabled=press is None, layout=w.Layout(width="auto"))
        b.add_class("gpuherd-action")
        b.on_click(clicked(action))
        buttons.append(b)
    rows = []
    for i in range(0, len(buttons), PER_ROW):
        row = w.HBox(buttons[i:i + PER_ROW], layout=w.Layout(flex_flow="row wrap"))
        row.add_class("gpuherd-actions")
        rows.append(row)
    box = w.VBox([body, *rows, ask, *below])
    box.add_class("gpuherd-reply-widget")
    box.buttons = buttons             # type: ignore[attr-defined]
    box.confirm_box = ask             # type: ignore[attr-defined]
    box.confirm_yes, box.confirm_no = yes, no   # type: ignore[attr-defined]
    return box


class RichReply:
    """A reply for `display()`: in a live front end its widget (buttons that work), with the
    HTML and plain text beside it in the same bundle for every viewer that has no kernel."""

    def __init__(self, reply: Reply, press: Press | None = None, *,
                 below: Sequence[ipywidgets.Widget] = ()) -> None:
        self.reply = reply
        self.press = press
        self.below = list(below)
        self._widget: ipywidgets.VBox | None = None

    def __repr__(self) -> str:
        return f"RichReply({self.reply.title!r})"

    @property
    def live(self) -> bool:
        """Whether a widget is worth showing: buttons to press or widgets below."""
        return bool(button_actions(self.reply) or self.below)

    @property
    def widget(self) -> ipywidgets.VBox:
        if self._widget is None:
            self._widget = reply_widget(self.reply, self.press, below=self.below)
        return self._widget

    def _repr_html_(self) -> str:
        return reply_html(self.reply, commands=True)

    def text(self) -> str:
        """The shell's rendering (`render_text`), on a console that is told it is not in Jupyter:
        rich would otherwise publish an (empty) display of its own from inside a kernel."""
        import io

        from rich.console import Console

        from gpuherd.bot.render_text import renderable

        console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=False,
                          force_jupyter=False, record=True)
        console.print(renderable(self.reply))
        return console.export_text().rstrip() + "\n"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        bundle: dict[str, Any] = {}
        if self.live:
            bundle.update(self.widget._repr_mimebundle_() or {})
        bundle["text/html"] = self._repr_html_()
        bundle["text/plain"] = self.text()
        return bundle
