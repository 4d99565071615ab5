"""Method families, one folder each: config.py (options and named presets, nothing heavy), the
cache, its decode kernel and its calibration. This is the one list of families: importing it
registers every preset, so `kvshrink methods` and option checks run without torch."""
# ruff: noqa: I001  (the order is the order `kvshrink methods` lists them in)

from .quant import config as quant  # noqa: F401
from .lowrank import config as lowrank  # noqa: F401
from .evict import config as evict  # noqa: F401
from .rvq import config as rvq  # noqa: F401
from .kvcomp import config as kvcomp  # noqa: F401
from .budget import config as budget  # noqa: F401
from .mixed import config as mixed  # noqa: F401
from .peers import config as peers  # noqa: F401
from ..registry import REGISTRY, get_method, method_names  # noqa: F401  (the registry, filled)
