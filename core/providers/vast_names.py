"""vast.ai's own GPU name spellings, and which of them a gpuherd GPU word or name stands for.

Why: vast.ai filters `gpu_name` by its exact spelling ("RTX 6000Ada", "A100 SXM4", "H100 SXM"),
while gpuherd's query speaks neutral words (`4090`, `h100`, `gpu=rtx 6000 ada`) and normalised
names ("A100 80GB"). To let vast.ai narrow a search by GPU (so its result cap is not filled with
cheaper cards first), a word must become the *exact* list of vast spellings it stands for: a
missing spelling would silently drop offers, an extra one would only be filtered out locally.

Where the spellings come from:
  * `VAST_GPU_NAMES` is the list of GPU name constants in the official client, PyPI `vastai`
    1.9.1, `vastai/data/query.py` ("GPU name constants (from vast/controller/gpulist.json,
    column [1])"), i.e. vast.ai's own controller list, copied as data (names only).
  * shared/reference/vast.md §3 confirms the spacing of the common ones ("RTX 4090",
    "H100 SXM"); its §2.2 examples send them with spaces (`RTX_4090` -> "RTX 4090").

Which spellings a word stands for is not written by hand: it is computed from that list with
the very functions the local filter uses (`vast_wire._gpu_name` to normalise a vast spelling,
both memory variants where one name covers two sizes, and `query.gpu_model_matches`), so the
server-side list and the local filter can never disagree about a spelling in vast's list. A word
that no spelling in the list matches (a typo, a card vast does not sell) sends no `gpu_name`
term: the local filter alone decides, which can only keep more. `MODEL_NAMES` is that table for
every bare model word the query language knows; tests/test_vast_parity.py pins the entries that
matter (4090, h100, a100, rtx 6000 ada, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from ..query import GPU_MODELS, gpu_model_matches
from .vast_wire import _gpu_name

__all__ = ["MODEL_NAMES", "VAST_GPU_NAMES", "names_for_model", "names_for_name"]

# vastai 1.9.1, vastai/data/query.py, GPU name constants, in the order they are listed there.
VAST_GPU_NAMES: tuple[str, ...] = (
    # NVIDIA data centre / AI
    "A10", "A10g", "A16", "A30", "A40", "A100 PCIE", "A100 SXM4", "A100 SXM", "A100X", "A800 PCIE",
    "B200", "GH200 SXM", "H100 PCIE", "H100 SXM", "H100 NVL", "H200", "H200 NVL", "L4", "L40", "L40S",
    "Tesla K20c", "Tesla K80", "Tesla M40", "Tesla P4", "Tesla P6", "Tesla P40", "Tesla P100",
    "Tesla T4", "Tesla V100",
    # NVIDIA consumer: GeForce / GTX
    "GeForce 970", "GTX 750 Ti", "GTX 1050", "GTX 1050 Ti", "GTX 1060", "GTX 1070", "GTX 1070 Ti",
    "GTX 1080", "GTX 1080 Ti", "GTX 1650", "GTX 1650 S", "GTX 1650 Ti", "GTX 1660", "GTX 1660 S",
    "GTX 1660 Ti", "GTX TITAN X",
    # RTX 20, 30, 40, 50 series
    "RTX 2060", "RTX 2060S", "RTX 2070", "RTX 2070S", "RTX 2080", "RTX 2080S", "RTX 2080 Ti",
    "RTX 3050", "RTX 3060", "RTX 3060 laptop", "RTX 3060 Ti", "RTX 3070", "RTX 3070 laptop",
    "RTX 3070 Ti", "RTX 3080", "RTX 3080 Ti", "RTX 3090", "RTX 3090 Ti",
    "RTX 4060", "RTX 4060 laptop", "RTX 4060 Ti", "RTX 4070", "RTX 4070 laptop", "RTX 4070S",
    "RTX 4070S Ti", "RTX 4070 Ti", "RTX 4080", "RTX 4080 laptop", "RTX 4080S", "RTX 4090", "RTX 4090D",
    "RTX 4090 Ti",
    "RTX 5060", "RTX 5060 Ti", "RTX 5070", "RTX 5070 Ti", "RTX 5080", "RTX 5090", "RTX 5090 Ti",
    # Titan
    "Titan RTX", "Titan V", "TITAN V CEO", "Titan X", "Titan Xp",
    # Quadro
    "Quadro K620", "Quadro K2200", "Quadro P2000", "Quadro P4000", "Quadro P5000", "Quadro P6000",
    "Quadro GP100", "Quadro GV100", "Q RTX 4000", "Q RTX 5000", "Q RTX 6000", "Q RTX 8000",
    # RTX A series, Ada generation, RTX PRO (Blackwell)
    "RTX A2000", "RTX A4000", "RTX A4500", "RTX A5000", "RTX A6000",
    "RTX 2000Ada", "RTX 4000Ada", "RTX 4500Ada", "RTX 5000Ada", "RTX 5880Ada", "RTX 6000Ada",
    "RTX PRO 4000", "RTX PRO 4000 Mobile", "RTX PRO 4500", "RTX PRO 5000", "RTX PRO 6000",
    "RTX PRO 6000 S", "RTX PRO 6000 WS", "RTX PRO 6000 Max-Q",
    # mining / other
    "CMP 50HX", "CMP 170HX", "P104-100", "P106-100",
    # AMD
    "InstinctMI50", "InstinctMI100", "InstinctMI210", "InstinctMI250X",
    "PRO W6800", "PRO W7800", "PRO W7900", "Pro V620", "Radeon VII", "Radeon Pro VII",
    "RX 6800", "RX 6800 XT", "RX 6900 XT", "RX 6950 XT", "RX 7600", "RX 7700 XT", "RX 7800 XT",
    "RX 7900 GRE",
)

# The memory sizes one vast spelling can be sold with, as far as naming is concerned: gpuherd
# names an "A100 SXM4" "A100 40GB" or "A100 80GB" by its memory (vast_wire._gpu_name).
_MEMORY_VARIANTS = (None, 24576, 81920)


@lru_cache(maxsize=512)
def _shown(vast_name: str) -> tuple[str, ...]:
    """The names gpuherd can show for an offer vast.ai calls `vast_name`."""
    return tuple(dict.fromkeys(_gpu_name(vast_name, ram) for ram in _MEMORY_VARIANTS))


def _pick(test: Callable[[str], bool], every: bool) -> tuple[str, ...]:
    """Spellings for which `test(shown_name)` holds for some (every=False) or every shown name."""
    found = []
    for vast_name in VAST_GPU_NAMES:
        hits = [test(shown) for shown in _shown(vast_name)]
        if all(hits) if every else any(hits):
            found.append(vast_name)
    return tuple(found)


@lru_cache(maxsize=1024)
def names_for_model(word: str, *, every: bool = False) -> tuple[str, ...]:
    """vast's spellings whose offers the local model-word filter keeps (`4090` -> RTX 4090,
    RTX 4090 Ti). `every=True`: only spellings every offer of which matches, the safe list for a
    negated filter (`gpu notin a100`), where vast.ai may drop only what we drop too."""
    return _pick(lambda shown: gpu_model_matches(shown, word), every)


@lru_cache(maxsize=1024)
def names_for_name(name: str, *, every: bool = False) -> tuple[str, ...]:
    """vast's spellings for an exact `gpu_name=NAME`: the spellings gpuherd shows as NAME (in
    any letter case, `A100_80GB` -> A100 PCIE, A100 SXM4, A100 SXM, A100X), the spelling NAME
    itself when vast's list has it in another case, and NAME as typed, which is what the
    official CLI sends. For `every=True` (negated filters) only spellings always shown as NAME."""
    want = name.casefold()
    found = list(_pick(lambda shown: shown.casefold() == want, every))
    found.extend(v for v in VAST_GPU_NAMES if v.casefold() == want)
    found.append(name)
    return tuple(dict.fromkeys(found))


MODEL_NAMES: dict[str, tuple[str, ...]] = {word: names_for_model(word) for word in sorted(GPU_MODELS)}
