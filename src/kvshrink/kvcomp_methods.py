"""Registered KVComp methods (kvcomp_cache.py): error-bounded quantization + Huffman codes.

  kvcomp-eb{B}   relative error bound B for keys and values, keys per channel in blocks of
                 64 tokens, values per token in blocks of 128, Huffman tables per layer and
                 keys/values, float16 sink of 4 tokens; decode steps decompress each block
                 inside the attention kernel

Options: `:keb=0.05` / `:veb=0.2` (bounds for keys / values alone), `:entropy=0` (the same
symbols as fixed-width packed integers: what entropy coding adds), `:attend=decode`
(decode everything, then attend: the reference), `:drift=0.05`, `:sink=`, `:window=`,
`:key_block=`, `:value_block=`, `:splits=`, `:background=0` (code filled blocks on the decode
step itself instead of a worker thread).
"""

from __future__ import annotations

from .methods import SINK, Method, register

BOUNDS = (0.05, 0.1, 0.2, 0.3)
DEFAULT = ("kvcomp-eb0.1",)
TUNABLE = ("eb", "keb", "veb", "entropy", "attend", "drift", "sink", "window", "key_block", "value_block", "splits",
           "background")


def kvcomp_cache(config, eb: float = 0.1, keb: float | None = None, veb: float | None = None, entropy: int = 1,
                 sink: int = SINK, method: str | None = None, **options):
    from .attention.paged import use_kvshrink_attention
    from .errors import KvshrinkError
    from .kvcomp_cache import KVCompCache

    if not hasattr(config, "set_attn_implementation"):
        raise KvshrinkError(f"{method or 'a kvcomp method'} needs the model, not its config: "
                            f"CompressedCache.from_method({method!r}, model)")
    from .calibfile import model_header

    use_kvshrink_attention(config)
    cache = KVCompCache(config.config, key_bound=eb if keb is None else keb, value_bound=eb if veb is None else veb,
                        entropy=bool(entropy), sink=sink, method=method, **options)
    cache.model_header = model_header(config)  # for cache.save(path): the file names its model
    return cache


def prepare(model, tokenizer=None, corpus=None, **_):
    """Decode steps attend through the cache's own states: the model uses the "kvshrink" attention."""
    from .attention.paged import use_kvshrink_attention

    use_kvshrink_attention(model)
    return model


for _b in BOUNDS:
    _name = f"kvcomp-eb{_b}"
    register(Method(_name, f"KVComp: error bound {_b} (keys per channel, values per token), Huffman-coded "
                           "blocks decoded inside attention", kvcomp_cache, options={"eb": _b, "method": _name},
                    tunable=TUNABLE, prepare=prepare, default=_name in DEFAULT))
