"""Whether this CPU's int8 kernels saturate: x86 without VNNI needs 7-bit weights (`reduce_range`)."""
from __future__ import annotations

import functools
import platform
from pathlib import Path


@functools.lru_cache(maxsize=1)
def int8_products_saturate() -> bool:
    """Whether ORT's uint8 x int8 GEMMs can saturate on this CPU.

    x86 CPUs without VNNI (AVX2, AVX-512F) multiply u8 by s8 with `vpmaddubsw`, which adds each pair
    of products into a saturating int16: 2 x 255 x 127 overflows it, so large activations meeting
    large weights come out wrong. VNNI (`avx512_vnni`, `avx_vnni`) accumulates in int32, and ARM's
    kernels do not pair-saturate. 7-bit weights (|q| <= 63) keep every pair inside int16.
    Where the flags cannot be read on x86, assume the worst.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))
