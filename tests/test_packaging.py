"""gpuherd installs under one name: a user's own `core/` or `bot/` folder (a common notebook
layout) neither shadows gpuherd nor is shadowed by it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_user_folders_named_core_and_bot_change_nothing(tmp_path: Path) -> None:
    for name in ("core", "bot", "notebook_ext"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'user {name}'\n")
    script = (
        "import core, bot, notebook_ext\n"
        "import gpuherd.core.service, gpuherd.bot.grammar, gpuherd.notebook_ext\n"
        "assert core.OWNER == 'user core', core.__file__\n"
        "assert bot.OWNER == 'user bot', bot.__file__\n"
        "assert notebook_ext.OWNER == 'user notebook_ext'\n"
        "assert not hasattr(gpuherd.core, 'OWNER')\n"
        "assert gpuherd.bot.grammar.REGISTRY.find('boot').name == 'boot'\n"
        "print(gpuherd.core.service.__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "gpuherd.core.service"


def test_cli_runs_from_a_directory_with_its_own_core(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("raise ImportError('the user folder was imported')\n")
    done = subprocess.run([sys.executable, "-m", "gpuherd.bot.cli", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                          "GPUHERD_HOME": str(tmp_path / "home")}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "gpuherd" in done.stdout and "search" in done.stdout
