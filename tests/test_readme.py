"""The README stays true: its tour is run for real and every line it shows (normalised for ids,
prices and times, see tests/readme_transcripts.py) must still be printed, in order; the guards
transcript's first reply likewise (its idle stop takes a real minute: `readme_transcripts.py
--check guards` runs it whole)."""

from __future__ import annotations

import readme_transcripts as rt


def test_normalise_keeps_words_and_drops_what_varies() -> None:
    a = rt.normalise("g-7925   alice   research   running   H100 SXM x1    $2.89/h    <$0.01       1s")
    b = rt.normalise("g-1a2b   alice   research   running   H100 SXM x1    $3.10/h    $0.02       19s")
    assert a == b
    assert rt.normalise("Stopped g-1688") != rt.normalise("Started g-1688")


def test_drift_finds_a_missing_line_and_a_changed_order() -> None:
    out = "Booted g-1234 (budget)\nbilling $0.16/h\nStopped g-1234\n"
    assert rt.drift("Booted g-9999 (budget)\nStopped g-9999\n", out) == []
    assert rt.drift("Booted g-9999 (budget)\nDestroyed g-9999\n", out) == ["Destroyed g-ID"]
    assert rt.drift("Stopped g-1111\nBooted g-1111 (budget)\n", out) == ["Booted g-ID (budget)"]


def test_the_readme_tour_is_what_the_shell_prints() -> None:
    output = rt.run_session(rt.TOUR)
    assert "Traceback" not in output
    block = rt.readme_block("tour")
    assert len([x for x in block.splitlines() if x.strip()]) > 40      # the whole session, not an excerpt
    assert rt.drift(block, output) == []


def test_the_readme_guards_transcript_starts_as_the_shell_does() -> None:
    output = rt.run_session(rt.GUARDS_QUICK)
    block = rt.readme_block("guards")
    first_reply = block.split("\n» ", 1)[0].split("\ngpu> /gpu guards", 1)[0]
    assert "idle armed" in first_reply
    assert rt.drift(first_reply, output) == []
