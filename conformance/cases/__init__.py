"""Case rows, one module per component family. Importing this package registers every family.

A case is a declarative row; ``Case.id`` is stable and is what ``python -m conformance rerun`` takes.
"""

from __future__ import annotations

from . import (  # noqa: F401,E402
    attention,
    cache_stream,
    compressor,
    compressor_stream,
    dspark,
    engram,
    formats,
    head,
    indexer,
    indexer_cache,
    indexer_v41,
    linear,
    mhc,
    moe,
    moe_nvfp4,
    mtp,
    norms,
    qkv,  # noqa: F401,E402
    rope,
)
from ._case import CASES, Case, all_cases, cases_for, dist_tensor  # noqa: F401
