"""The README's transcripts, produced by running them: the tour ("A short tour") and the guards at
work ("Watching it happen on the sandbox").

    .venv-test/bin/python tests/readme_transcripts.py            # print both sessions
    .venv-test/bin/python tests/readme_transcripts.py --write    # regenerate the README's blocks
    .venv-test/bin/python tests/readme_transcripts.py --check    # exit 1 when the README drifted

Each session is the real `gpuherd shell --yes` in a subprocess, with its stdin piped, on a fresh
data directory, the sandbox provider and `GPUHERD_SANDBOX_TIME_SCALE=0` (instant boots). A README
block is the text between a `<!-- transcript:NAME -->` marker and the end of the fenced block
after it, so the README's prose around it stays hand-written.

Decisions:
* The comparison (`drift`) is of *normalised* lines: ids, confirmation tokens, offer ids, dollar
  amounts, times, durations, percentages, counts of offers and process ids change from run to
  run (the sandbox's prices drift every six hours, ids are random), the words do not. Every
  README line must appear in the run's output, in the same order; the output may have more (a
  new note) only when the README is regenerated, because the blocks are the whole output, so a
  line the product stopped printing or started printing differently is caught either way.
* The guards session waits out a one-minute idle window (the shortest a template allows) in real
  time, about 70 s, so the test suite checks only its first reply (`GUARDS_QUICK`); `--check`
  and `--write` run it whole.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

Step = str | float          # a line to type, or seconds to wait before the next one

TOUR: list[Step] = [
    "/gpu search 4090 <$0.5 limit=5",
    "/gpu boot budget max_model_len=4096 idle=45m",
    "/gpu boot research offer=sandbox:sb-0012",
    "/gpu budget set team=default 200",
    "/gpu status",
    "/gpu stop {budget}",
    "/gpu destroy {research}",
    "/gpu costs by=template",
    "/gpu boot budget max_len=4096",
    "/gpu search gpu_rm>=24",
    "/gpu stop {budget}",
]

GUARDS: list[Step] = [
    "/gpu boot budget idle=1m",
    75.0,
    "/gpu guards",
]
GUARDS_QUICK: list[Step] = GUARDS[:1]


@dataclass(frozen=True)
class Session:
    name: str
    steps: list[Step]


SESSIONS = {"tour": Session("tour", TOUR), "guards": Session("guards", GUARDS)}

_BOOTED = re.compile(r"^Booted (g-[0-9a-f]+) \((\S+)\)", re.M)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPUHERD_", "AWS_", "VAST_", "RUNPOD_", "SURF_", "SLACK_", "DISCORD_"))}
    env.update({"GPUHERD_HOME": str(home), "GPUHERD_SANDBOX_TIME_SCALE": "0", "COLUMNS": "80",
                "GPUHERD_LOCAL_USER": "alice", "NO_COLOR": "1", "TERM": "dumb"})
    return env


def run_session(steps: Sequence[Step], *, timeout_s: float = 240.0) -> str:
    """Type `steps` into a real `gpuherd shell --yes` and return everything it printed. A line may
    name an instance booted earlier in the session by its template (`{budget}`)."""
    with tempfile.TemporaryDirectory(prefix="gpuherd-readme-") as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "gpuherd.bot.cli", "shell", "--yes"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=_env(Path(tmp)), cwd=tmp, text=True, bufsize=1)
        assert proc.stdin is not None and proc.stdout is not None
        out: list[str] = []
        import threading

        reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout_s
        for step in steps:
            if isinstance(step, float):
                time.sleep(step)
                continue
            line = step
            if "{" in line:
                _wait_for_names(out, line, deadline)
                line = line.format(**_names("".join(out)))
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            _wait_for_answer(out, line, deadline)
        proc.stdin.close()
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        reader.join(timeout=5)
        return "".join(out)


def _names(text: str) -> dict[str, str]:
    return {template: instance for instance, template in _BOOTED.findall(text)}


def _wait_for_names(out: list[str], line: str, deadline: float) -> None:
    wanted = re.findall(r"{(\w+)}", line)
    while not all(w in _names("".join(out)) for w in wanted):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no instance booted for {wanted} before {line!r}")
        time.sleep(0.05)


def _wait_for_answer(out: list[str], line: str, deadline: float) -> None:
    """Until the shell echoed the line and went quiet for a moment (its reply is printed whole)."""
    echoed = f"> {line}"
    while echoed not in "".join(out):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the shell never read {line!r}")
        time.sleep(0.02)
    seen, quiet_since = len("".join(out)), time.monotonic()
    while time.monotonic() - quiet_since < 0.6:
        time.sleep(0.05)
        now = len("".join(out))
        if now != seen:
            seen, quiet_since = now, time.monotonic()


_NORMALISE = [
    (re.compile(r"\bg-[0-9a-f]{4,}\b"), "g-ID"),
    (re.compile(r"\bc_[A-Za-z0-9_-]{8,}"), "c_TOKEN"),
    (re.compile(r"\bsb-\d{4}\b"), "sb-N"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2} \d{2}:\d{2}(:\d{2})? UTC\b"), "TIME"),
    (re.compile(r"\(\d{4}-\d{2}\)"), "(MONTH)"),
    (re.compile(r"<?\$[\d,]+(\.\d+)?"), "$N"),
    (re.compile(r"\b\d+(\.\d+)? ?ms\b"), "N ms"),
    (re.compile(r"\b\d+(h|m|s|d)(\d+(m|s))?\b"), "DUR"),
    (re.compile(r"\b\d+ %|\b\d+%"), "N%"),
    (re.compile(r"\b(\d+) (offers|instances|checked|acted)\b"), r"N \2"),
    (re.compile(r"\bvm:\d+|\b[\w.-]+:\d+\b(?= *$)"), "PROC"),
    (re.compile(r"\b0\.\d{3}\b"), "0.N"),
    (re.compile(r"░+|█+"), "BAR"),
    (re.compile(r"[─━]+"), "RULE"),
    (re.compile(r"[ \t]+"), " "),
]


def normalise(line: str) -> str:
    for pattern, replacement in _NORMALISE:
        line = pattern.sub(replacement, line)
    return line.strip()


def drift(readme_block: str, output: str) -> list[str]:
    """README lines (normalised) missing from the output, in order: empty when the README is true."""
    got = [normalise(x) for x in output.splitlines() if x.strip()]
    missing, at = [], 0
    for want in (normalise(x) for x in readme_block.splitlines() if x.strip()):
        try:
            at = got.index(want, at) + 1
        except ValueError:
            missing.append(want)
    return missing


def _block_span(text: str, name: str) -> tuple[int, int]:
    marker = f"<!-- transcript:{name} -->"
    start = text.index(marker)
    fence = text.index("```", start)
    body = text.index("\n", fence) + 1
    end = text.index("```", body)
    return body, end


def readme_block(name: str, text: str | None = None) -> str:
    text = README.read_text(encoding="utf-8") if text is None else text
    body, end = _block_span(text, name)
    return text[body:end]


def write_block(name: str, output: str) -> None:
    text = README.read_text(encoding="utf-8")
    body, end = _block_span(text, name)
    clean = "\n".join(x.rstrip() for x in output.strip("\n").splitlines()) + "\n"
    README.write_text(text[:body] + clean + text[end:], encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the README's blocks with fresh output")
    parser.add_argument("--check", action="store_true", help="exit 1 if a README line is not in the output")
    parser.add_argument("sessions", nargs="*", metavar="session", help=f"which: {', '.join(SESSIONS)} (default all)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.sessions if n not in SESSIONS]
    if unknown:
        parser.error(f"no session {', '.join(unknown)} (there are: {', '.join(SESSIONS)})")
    status = 0
    for name in args.sessions or list(SESSIONS):
        output = run_session(SESSIONS[name].steps)
        if args.write:
            write_block(name, output)
            print(f"README: {name} transcript regenerated ({len(output.splitlines())} lines)")
        elif args.check:
            missing = drift(readme_block(name), output)
            for line in missing:
                print(f"{name}: README line not in the output: {line}")
            status |= bool(missing)
        else:
            print(output)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
