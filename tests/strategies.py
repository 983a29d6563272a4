"""Shared hypothesis strategies: keyword-only, small defaults, non-tile-multiple shapes on purpose."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def matmul_shapes(draw, *, max_m: int = 80, max_k: int = 150, max_n: int = 90):
    """(M, K, N), biased towards sizes that are not multiples of any tile (1, primes, tile +- 1)."""
    awkward = st.sampled_from([1, 2, 3, 7, 8, 9, 17, 63, 64, 65, 127, 129])

    def dim(limit, label):
        return draw(st.one_of(awkward.filter(lambda d: d <= limit), st.integers(1, limit)), label=label)

    return dim(max_m, "M"), dim(max_k, "K"), dim(max_n, "N")


def arrays(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    """Reproducible float32 normal values for a drawn shape."""
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


seeds = st.integers(0, 2**16)
