"""`gpuherd completion bash|zsh`: a completion script for gpuherd's own commands, the /gpu
commands and their options, generated from the argparse parser and the grammar's registry (so it
cannot fall out of step with either). Kept apart from cli.py, which must stay light to import:
this module imports the grammar, and only `gpuherd completion` loads it.

argparse has no public way to walk its sub-parsers; `_actions` and `_SubParsersAction` are read
as they have been since Python 3.2."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass


def _words_of(parser: argparse.ArgumentParser) -> list[str]:
    """A terminal command's options, the choices of its positionals, its sub-actions and theirs."""
    words: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                words += [name, *_words_of(child)]
        elif action.option_strings:
            words += [o for o in action.option_strings if o.startswith("--")]
        elif action.choices:
            words += [str(c) for c in action.choices]
    return list(dict.fromkeys(w for w in words if w not in ("--help",)))


@dataclass(frozen=True)
class _Completion:
    globals_: list[str]
    commands: list[tuple[str, str]]                 # (name, what it does), aliases included
    words: dict[str, list[str]]                     # command -> what may follow it


def _completion_data() -> _Completion:
    """From the parser and the grammar's registry (imported: a script is printed once)."""
    from . import grammar
    from .cli import build_parser

    parser = build_parser()
    globals_ = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    commands: list[tuple[str, str]] = []
    words: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {pseudo.dest: pseudo.help or "" for pseudo in action._choices_actions}
            for name, sub in action.choices.items():
                commands.append((name, helps.get(name, "")))
                words[name] = _words_of(sub)
    names = [c.name for c in grammar.REGISTRY.all()]
    for cmd in grammar.REGISTRY.all():
        options = [f"{o}=" for o in cmd.options if o != "*"]
        options += [f"{p.option}=" for p in cmd.params if p.option and f"{p.option}=" not in options]
        positional = [c for p in cmd.params if p.option is None and not p.rest for c in p.choices]
        if any(p.complete == "command" for p in cmd.params):
            positional += names
        if any(p.complete == "period" for p in cmd.params):
            positional += ["today", "week", "month"]
        after = [*positional, *options, "--yes", "--no-wait", "--json", "--help"]
        if cmd.name == "guards":
            after.insert(0, "--run")
        for name in (cmd.name, *cmd.aliases):
            commands.append((name, cmd.summary))
            words[name] = after
    return _Completion(globals_, commands, words)


def _bash_words(words: Sequence[str]) -> str:
    return " ".join(words).replace("'", "")


def completion_script(shell: str) -> str:
    """A bash or zsh script completing gpuherd's commands, the /gpu commands and their options."""
    data = _completion_data()
    if shell == "bash":
        cases = "\n".join(f"        {name}) words='{_bash_words(data.words[name])}' ;;" for name, _ in data.commands)
        top = _bash_words([*data.globals_, *(n for n, _ in data.commands)])
        return f"""# gpuherd completion for bash. Add to ~/.bashrc:  source <(gpuherd completion bash)
_gpuherd_complete() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} cmd="" words="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${{COMP_WORDS[i]}} in
            -*) ;;
            *) cmd=${{COMP_WORDS[i]}}; break ;;
        esac
    done
    case $cmd in
        "") words='{top}' ;;
{cases}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
    if [[ ${{#COMPREPLY[@]}} -eq 1 && ${{COMPREPLY[0]}} == *= ]]; then
        compopt -o nospace 2>/dev/null
    fi
}}
complete -F _gpuherd_complete gpuherd
"""
    def zq(text: str) -> str:
        return "'" + text.replace("'", "'\\''") + "'"
    described = "\n".join(f"        {zq(n + ':' + d.replace(':', ' -'))}" for n, d in data.commands)
    cases = "\n".join(f"        {n}) opts=({' '.join(zq(w) for w in data.words[n])}) ;;" for n, _ in data.commands)
    globals_ = " ".join(zq(g) for g in data.globals_)
    return f"""#compdef gpuherd
# gpuherd completion for zsh. Add to ~/.zshrc (after compinit):  source <(gpuherd completion zsh)
_gpuherd() {{
    local -a commands opts          # not `words`: zsh's own array of the command line
    local cmd="" i
    commands=(
{described}
    )
    for (( i = 2; i < CURRENT; i++ )); do
        [[ ${{words[i]}} == -* ]] && continue
        cmd=${{words[i]}}
        break
    done
    if [[ -z $cmd ]]; then
        _describe -t commands 'gpuherd command' commands
        compadd -- {globals_}
        return
    fi
    case $cmd in
{cases}
    esac
    local w
    for w in $opts; do
        if [[ $w == *= ]]; then compadd -S '' -- $w; else compadd -- $w; fi
    done
}}
if (( $+functions[compdef] )); then compdef _gpuherd gpuherd; fi
"""
