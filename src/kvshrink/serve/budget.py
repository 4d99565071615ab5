"""What a sequence's cache will hold, measured for the method the server runs.

A compressed cache's bytes are not a fixed multiple of its tokens: float16 sink tokens, a block
still filling (its keys staged per token, two bits wider), whole coded blocks, a sliding layer's freed
blocks. So before serving, `measure` runs one prompt of `probe` tokens through a fresh cache of
the method in chunks of `step` tokens and records the bytes it really holds after each chunk;
`need(n)` is the most held at any measured length up to the first one >= n (so a block about to
be coded is counted at its staged size), and past the probe grows at the measured rate of its
last half. The server reserves `need(prompt + max_tokens)` when it admits a request.

Decode steps may hold more than a prompt of the same length: their tokens wait in float16 before
they are staged as codes (core/store.py: in runs of `gather`, 8 for the int family; a whole block's
worth for a layout without it). So `measure` also decodes tokens one at a time after a one-chunk
prompt, through two whole blocks (so one full cycle is seen whatever the prompt left staged), and
`extra`, the most they held above the prompt-grown need at the same length, is added to every need.
For `int4` it is 0.12 MB (it was 1.77 MB when a block's worth waited in float16; without it a
decoding request outgrew its reservation by up to 60% and was then preempted). It is the same for
a request of few new tokens: how many float16 tokens k decode steps leave depends on what the
prompt left staged, so a bound by k would need each layout's block phase (not built).
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
    extra: int = 0  # the most decode steps held above a prompt of the same length

    def need(self, tokens: int) -> int:
        """Bytes a cache of `tokens` tokens may hold, however many of them were decoded one at a time."""
        if tokens <= 0:
            return 0
        return self.prompt_need(tokens) + self.extra

    def prompt_need(self, tokens: int) -> int:
        """The bytes of a cache grown by prompt chunks only."""
        if tokens > self.lengths[-1]:
            return int(self.held[-1] + (tokens - self.lengths[-1]) * self.rate) + 1
        return int(self.held[bisect.bisect_left(self.lengths, tokens)])

    def per_token(self) -> float:
        return self.held[-1] / self.lengths[-1]


@torch.no_grad()
def measure(model, make_cache, ids: torch.Tensor, step: int = 32, decode: int = 0) -> ByteModel:
    """ids (1, n): the probe prompt; make_cache() -> a fresh cache of the method; decode: tokens to
    decode one at a time after a prompt of `step` tokens (see the module's text; 0: none)."""
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
    out = ByteModel(lengths, held, rate)
    if decode:
        cache, top = make_cache(), 0
        ids = ids.repeat(1, -(-(step + decode) // ids.shape[1]))  # the tokens' identity does not matter here
        model(input_ids=ids[:, :step], position_ids=torch.arange(step)[None], **with_cache(model, cache), use_cache=True)
        for at in range(step, step + decode):
            model(input_ids=ids[:, at:at + 1], position_ids=torch.tensor([[at]]), **with_cache(model, cache),
                  use_cache=True)
            top = max(top, cache_nbytes(cache) - out.prompt_need(at + 1))
        out.extra = top
    return out


def decode_span(cache) -> int:
    """Decode steps that take a cache of this layout through two whole blocks (one full cycle of float16
    tokens, whatever a prompt left staged): its stores' block (128 for a cache without stores)."""
    stores = cache.layers[0].stores() if hasattr(cache.layers[0], "stores") else []
    return 2 * (stores[0].block if stores else 128)
