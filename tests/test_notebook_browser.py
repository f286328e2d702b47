"""The panel as a standalone page in a real browser: `gpuherd panel` (Voila) on loopback, Debian's
Chromium driven by Playwright (no browser download), every request off loopback refused so a
CDN dependency would show. Search, Boot, the progress bar reaching healthy, the machine's row
appearing, Stop. Skips with its reason where Chromium or Playwright is missing (`.ci/run`
installs Chromium from Debian's packages)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from gpuherd.bot.cli import panel_command
from tests.live_server import free_port

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = os.environ.get("GPUHERD_PANEL_SCREENSHOT")     # also save it here (the README's copy)


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run does it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (Python) is not installed"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if proc.poll() is not None:
            raise AssertionError(f"voila exited with {proc.returncode}")
        try:
            # Voila's server API, not the page: a GET of the page renders the notebook in a kernel
            # of its own (seconds, and a second panel running beside the browser's)
            if httpx.get(url + "api", timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError("voila did not start")


def test_panel_page_search_boot_progress_stop(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    env = {**os.environ, "GPUHERD_HOME": str(tmp_path / "home"), "GPUHERD_SANDBOX_TIME_SCALE": "0.02",
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    cmd = panel_command("127.0.0.1", port)
    assert "--no-browser" in cmd and "--Voila.ip=127.0.0.1" in cmd
    log = (tmp_path / "voila.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    off_loopback: list[str] = []
    try:
        _wait_up(url, proc)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def route(r):  # type: ignore[no-untyped-def]
                host = urlparse(r.request.url).hostname
                if host in ("127.0.0.1", "localhost"):
                    return r.continue_()
                off_loopback.append(r.request.url)
                return r.abort()
            page.route("**/*", route)
            page.goto(url, timeout=120_000)
            query = page.locator(".gpuherd-query input")
            query.wait_for(timeout=120_000)
            query.fill("4090")
            page.locator(".gpuherd-search").first.click()
            # the panel lists offers as it opens; wait for the list of this search (its title names
            # the query), or the click could land on a row of the first list as it is replaced
            page.locator(".gpuherd-offers-note", has_text="gpu=4090").wait_for(timeout=60_000)
            boot = page.locator("button.gpuherd-boot:not([disabled])").first
            boot.wait_for(timeout=60_000)
            boot.click()
            page.locator('.gpuherd-phase[data-phase="healthy"]').wait_for(timeout=60_000)
            page.get_by_role("tab", name="Instances").click()
            page.locator('.gpuherd-instance[data-state="running"]').wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "panel.png"), full_page=True)
            if SCREENSHOT:
                shutil.copy(tmp_path / "panel.png", SCREENSHOT)
            page.locator("button.gpuherd-stop").first.click()
            page.locator('.gpuherd-instance[data-state="stopped"]').wait_for(timeout=60_000)
            running = page.locator('.gpuherd-instance[data-state="running"]').count()
            assert running == 0
            browser.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert (tmp_path / "panel.png").stat().st_size > 10_000
    # the page works with everything off loopback refused; Voila's template still asks for
    # Font Awesome's CSS from a CDN (the panel uses no icons, so nothing it shows needs it)
    assert all("jsdelivr" in u or "fontawesome" in u.lower() for u in off_loopback), off_loopback
    # and what the kernel's core recorded: one machine, stopped
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{tmp_path / 'home' / 'gpuherd.db'}")
    with engine.connect() as conn:
        states = [r[0] for r in conn.execute(text("SELECT state FROM instances"))]
    engine.dispose()
    assert states == ["stopped"], states
