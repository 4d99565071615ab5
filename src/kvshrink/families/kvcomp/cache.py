"""KVCompCache: error-bounded quantization + entropy coding, decoded inside attention (KVComp).

A `CompressedCache` whose stores (core/store.py) code with `EntropyCodec` (codec.py): float16
sink tokens, the entropy-coded body (keys in blocks of `key_block` tokens quantized per channel,
values in blocks of `value_block` tokens quantized per token; both stores grow by whole value
blocks, in step), and the tokens of an unfinished value block waiting in float16 (the stage, as
the paper keeps its recent tokens), with at least `window` recent tokens float16.

A call of at most `FUSED_QUERIES` tokens (decoding) on the CPU gets `SplitStates`
(attention/split.py; kernel.py): the fused kernel decodes each block where it is consumed.
Longer calls (prefill, perplexity chunks) decode the body and attend (`attend="decode"` does that
on every call: the reference). Tokens pass through float16 before coding, as in every kvshrink
store; the error bound is relative to those float16 values.

`save(path)` / `kvshrink.load_cache(path, model)` (io.py) write and read the coded form itself,
so a resumed chat costs a file read, not a prefill.
"""

from __future__ import annotations

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention
from ...codecs.base import Codec, Fp16
from ...codecs.errbound import ErrorBound
from ...core.calibfile import model_header
from ...core.layer import ATTENDS
from ...errors import KvshrinkError
from ...spec import spec_from_config
from ..quant.cache import CompressedCache, CompressedLayer
from . import io
from .codec import EntropyCodec
from .config import KVCompConfig
from .kernel import KVCompBody


class KVCompLayer(CompressedLayer):
    def stage_codec(self, codec: Codec) -> Codec:
        return Fp16()  # an unfinished value block waits as float16 tokens, as KVComp keeps its recent ones

    layout = "KVComp"

    def _reads_stage(self, states) -> bool:
        return False  # its kernel reads the body; the stage joins the dense tokens

    def _kernel_supports(self, head_dim: int) -> bool:
        return True  # the kernel decodes any error-bounded, prefix-coded body

    def _body(self):
        if self.k.body is None:
            return None
        return KVCompBody(self.k.body.view(), self.v.body.view())


class KVCompCache(CompressedCache):
    """A `CompressedCache` of `KVCompLayer`s; see the module docstring.

    key_bound / value_bound: relative error bounds; key_block / value_block: tokens per coded
    block (value_block a multiple of key_block); entropy=False keeps fixed-width packed codes;
    drift: the table refresh threshold; splits: parallel ranges per head in the fused kernel;
    background: value blocks filled by decode steps are coded on a worker thread, off the
    critical path (the next call waits for them: results do not depend on the thread's timing).
    """

    layer_cls = KVCompLayer

    def __init__(self, config=None, key_bound: float = 0.1, value_bound: float = 0.1, key_block: int = 64,
                 value_block: int = 128, sink: int = 4, window: int = 0, entropy: bool = True,
                 drift: float = 0.05, attend: str = "fused", splits: int = 4, background: bool = True,
                 num_layers: int | None = None, method: str | None = None):
        for name, val, low in (("key_block", key_block, 1), ("value_block", value_block, 1)):
            if not isinstance(val, int) or val < low:
                raise KvshrinkError(f"{name} must be an integer >= {low}, got {val!r}")
        if value_block % key_block:
            raise KvshrinkError(f"value_block {value_block} is not a multiple of key_block {key_block}")
        if attend not in ATTENDS:
            raise KvshrinkError(f"unknown attend {attend!r}; use one of {', '.join(ATTENDS)}")
        if not isinstance(drift, (int, float)) or drift < 0:
            raise KvshrinkError(f"drift must be a non-negative number, got {drift!r}")
        keys, values = ErrorBound(key_bound, "channel"), ErrorBound(value_bound, "token")  # refuse bad bounds now
        if num_layers is None:
            if config is None:
                raise KvshrinkError("KVCompCache needs a model config or num_layers")
            num_layers = spec_from_config(config).num_layers
        if config is not None and attend == "fused":
            require_kvshrink_attention(config, method or "a kvcomp cache")
        codecs = [(EntropyCodec(keys, key_block, bool(entropy), float(drift)),
                   EntropyCodec(values, value_block, bool(entropy), float(drift))) for _ in range(num_layers)]
        super().__init__(config, sink=sink, window=window, block=value_block, num_layers=num_layers, method=method,
                         layer_codecs=codecs, splits=splits, background=background)
        self.key_bound, self.value_bound = float(key_bound), float(value_bound)
        self.key_block, self.value_block = key_block, value_block
        self.entropy, self.drift, self.attend, self.splits = bool(entropy), float(drift), attend, splits
        for layer in self.layers:
            layer.fused, layer.splits = attend == "fused", splits

    def _describe(self) -> str:
        coder = "Huffman" if self.entropy else "fixed-width packed"
        return (f"keys eb {self.key_bound} per channel in blocks of {self.key_block}, values eb {self.value_bound} "
                f"per token in blocks of {self.value_block}, {coder} codes, sink {self.sink}, window {self.window}, "
                f"{self.attend} decode attention" + (", blocks coded in the background" if self.background else ""))

    def save(self, path: str, model=None, ids=None) -> int:
        """Write the coded cache to `path` (safetensors), with the token ids it holds when given;
        returns the file's size in bytes (io.py)."""
        self.settle()
        return io.save(self, path, self.file_header(model), ids)

    def coding_stats(self) -> dict:
        """Bits per symbol of the codes against the Shannon limit, keys and values over all layers."""
        out = {}
        for name in ("k", "v"):
            st = [getattr(layer, name).codec.stats() for layer in self.layers if layer.is_initialized]
            n = sum(s["symbols"] for s in st)
            if not n:
                continue
            bits = sum(s["bits_per_symbol"] * s["symbols"] for s in st) / n
            ent = sum(s["entropy_bits_per_symbol"] * s["symbols"] for s in st) / n
            out["keys" if name == "k" else "values"] = {
                "bits_per_symbol": bits, "entropy_bits_per_symbol": ent, "symbols": n,
                "tables": sum(s["tables"] for s in st)}
        return out


def method_of(path: str) -> str | None:
    """The method of a KVComp cache file (io.py), None for another file."""
    return io.method_of(path)


def load(path: str, model) -> KVCompCache:
    """A KVCompCache read from `path` (written by `cache.save`), checked against `model`, which must
    use the kvshrink attention (`kvshrink.prepare(model, "kvcomp-eb0.1")`)."""
    settings, layers, ids = io.read(path, model)
    cache = KVCompCache(model.config, **settings)
    cache.model_header = model_header(model)
    cache.ids = ids
    if len(layers) != len(cache.layers):
        raise KvshrinkError(f"cache file {path!r} has {len(layers)} layers, the model {len(cache.layers)}")
    for layer, stores in zip(cache.layers, layers):
        if stores is not None:
            io.fill(layer, stores)
    return cache


def build(config: KVCompConfig, model, method: str) -> KVCompCache:
    if not hasattr(model, "set_attn_implementation"):
        raise KvshrinkError(f"{method} needs the model, not its config (a saved cache names its weights): "
                            f"kvshrink.from_method({method!r}, model)")
    cache = KVCompCache(model.config, key_bound=config.eb if config.keb is None else config.keb,
                        value_bound=config.eb if config.veb is None else config.veb, key_block=config.key_block,
                        value_block=config.value_block, sink=config.sink, window=config.window,
                        entropy=config.entropy, drift=config.drift, attend=config.attend, splits=config.splits,
                        background=config.background, method=method)
    return cache  # from_method records the model it names (cache.save)


def prepare(config: KVCompConfig, model, tokenizer=None, corpus=None):
    """Decode steps attend through the cache's own states: the model uses the "kvshrink" attention."""
    use_kvshrink_attention(model)
    return model
