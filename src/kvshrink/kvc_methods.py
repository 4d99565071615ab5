"""Registered eviction methods over a PagedCache (paged_cache.py).

  kvc-{2..64}x     KV-Compress: variable per-head budgets ranked across layers and heads,
                   squared attention scores (Rehg, arXiv 2410.00161)
  snapkv-{2..64}x  SnapKV: the same budget split evenly over heads, summed attention
                   pooled over 5 neighbours (Li et al., arXiv 2404.14469)
  kvc-8x+int4      eviction, then the kept rows as 4-bit codes (Hadamard-rotated, per token)

Options: `kvc-8x:alloc=uniform`, `:score=sum`, `:pool=5`, `:obs=16`, `:window=32`,
`:sink=4`, `:block=8`, `:interval=32`, `:norm=head|layer` (scores divided by each head's or
layer's total before the cross-head ranking), `:pooling=max` (with `:pool=N`: each token
scores the best of its N neighbours, so spans are kept whole), `:defer=1` (keep the first multi-token call whole
and evict after the next: context, then question), or an absolute budget `kvc-8x:tokens=256`
(tokens per head on average, per sequence); `:attend=decode` gathers and decodes the kept rows on
every decode step instead of reading them in place with the compiled kernel (attention/rows.py).
"""

from __future__ import annotations

from .codecs.quant import IntQuant
from .errors import KvshrinkError
from .methods import Method, register

RATIOS = (2, 4, 8, 16, 32, 64)
TUNABLE = ("alloc", "score", "pool", "obs", "sink", "window", "block", "interval", "tokens", "defer", "norm", "pooling",
           "attend")
DEFAULT = ("kvc-8x", "snapkv-8x", "kvc-8x+int4")


def paged_cache(model, ratio=None, bits: int | None = None, tokens=None, method=None, **options):
    from .attention.paged import use_kvshrink_attention
    from .paged_cache import PagedCache

    if not hasattr(model, "set_attn_implementation"):
        raise KvshrinkError(f"{method or 'an eviction method'} needs the model, not its config: "
                            f"CompressedCache.from_method({method!r}, model)")
    use_kvshrink_attention(model)
    codecs = {}
    if bits is not None:
        codecs = dict(key_codec=IntQuant(bits, "token", rotate=True, seed=1),
                      value_codec=IntQuant(bits, "token", rotate=True, seed=2))
    cache = PagedCache(model.config, ratio=None if tokens is not None else ratio, tokens=tokens, **codecs, **options)
    cache.method = method
    return cache


def prepare(model, tokenizer=None, corpus=None, **_):
    """The paged attention delegates to SDPA for every other cache, so the model is switched in place."""
    from .attention.paged import use_kvshrink_attention

    use_kvshrink_attention(model)
    return model


def _register(name: str, description: str, **options) -> None:
    register(Method(name, description, paged_cache, options={**options, "method": name}, tunable=TUNABLE,
                    prepare=prepare, default=name in DEFAULT))


for _r in RATIOS:
    _register(f"kvc-{_r}x", f"KV-Compress: evict to 1/{_r} of the tokens, variable per-head budgets, squared "
                            "attention scores, paged blocks of 16", ratio=_r)
    _register(f"snapkv-{_r}x", f"SnapKV: evict to 1/{_r} of the tokens, the same budget for every head, "
                               "attention pooled over 5 tokens", ratio=_r, alloc="uniform", score="sum", pool=5)
for _r in (4, 8):
    _register(f"kvc-{_r}x+int4", f"kvc-{_r}x with kept rows as 4-bit codes (Hadamard-rotated, per token)",
              ratio=_r, bits=4)
