"""What a sequence's cache will hold, measured for the method the server runs.

A compressed cache's bytes are not a fixed multiple of its tokens: float16 sink tokens, a block
still filling (its keys staged at twice the bits), whole coded blocks, a sliding layer's freed
blocks. So before serving, `measure` runs one prompt of `probe` tokens through a fresh cache of
the method in chunks of `step` tokens and records the bytes it really holds after each chunk;
`need(n)` is the most held at any measured length up to the first one >= n (so a block about to
be coded is counted at its staged size), and past the probe grows at the measured rate of its
last half. The server reserves `need(prompt + max_tokens)` when it admits a request.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from ..compat import with_cache
from ..core.cache import cache_nbytes


@dataclass
class ByteModel:
    lengths: list  # measured token counts, increasing
    held: list  # bytes held at each (running maximum)
    rate: float  # bytes per token past the last length

    def need(self, tokens: int) -> int:
        if tokens <= 0:
            return 0
        if tokens > self.lengths[-1]:
            return int(self.held[-1] + (tokens - self.lengths[-1]) * self.rate) + 1
        return int(self.held[bisect.bisect_left(self.lengths, tokens)])

    def per_token(self) -> float:
        return self.held[-1] / self.lengths[-1]


@torch.no_grad()
def measure(model, make_cache, ids: torch.Tensor, step: int = 32) -> ByteModel:
    """ids (1, n): the probe prompt; make_cache() -> a fresh cache of the method."""
    cache = make_cache()
    lengths, held, top = [], [], 0
    for at in range(0, ids.shape[1], step):
        chunk = ids[:, at:at + step]
        model(input_ids=chunk, position_ids=torch.arange(at, at + chunk.shape[1])[None], **with_cache(model, cache),
              use_cache=True)
        top = max(top, cache_nbytes(cache))
        lengths.append(at + chunk.shape[1])
        held.append(top)
    half = len(lengths) // 2
    if half < len(lengths) - 1:
        rate = (held[-1] - held[half]) / (lengths[-1] - lengths[half])
    else:  # one chunk measured: its own average
        rate = held[-1] / lengths[-1]
    return ByteModel(lengths, held, rate)
