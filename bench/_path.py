"""Lets bench scripts import the test fakes (tests/ is never installed); gpuherd itself comes from
the venv that `./run test` makes: `.venv-test/bin/python bench/bench_x.py`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
