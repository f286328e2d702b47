"""gpuherd inside Jupyter: `%load_ext gpuherd.notebook_ext` registers `%gpu`; `gpu_panel()` is
the panel (Offers, Instances, Costs, notices); `connect()` the Python API (`api.py`).

Layout: `corethread.py` (the loop the core runs on, off ipykernel's), `backend.py` (local core
or team server, the same calls and results), `api.py` (Gpu, Machine, the context manager),
`activity.py` (pings while cells run), `magics.py` (`%gpu`), `render_html.py` (a Reply as HTML
and buttons), `panel.py` (the ipywidgets panel), `page/` (the standalone page Voila serves)."""

from __future__ import annotations

from typing import Any

from .api import BootFailed, Gpu, Machine, MachineSession, NeedsConfirmation, connect

__all__ = ["BootFailed", "Gpu", "Machine", "MachineSession", "NeedsConfirmation", "connect", "gpu_panel",
           "load_ipython_extension", "unload_ipython_extension"]


def gpu_panel(gpu: Gpu | None = None, **kw: Any) -> Any:
    """The panel widget (ipywidgets 8) on `gpu` (default: the notebook's shared connection)."""
    from .panel import gpu_panel as build

    return build(gpu, **kw)


def load_ipython_extension(ipython: Any) -> None:
    """`%load_ext gpuherd.notebook_ext` (idempotent: `%reload_ext` registers the same magic once)."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload

    unload(ipython)
