"""CompressedCache: a transformers `Cache` whose layers store compressed tensors.

Each layer keeps its keys and its values in a `TokenStore` (see store.py):
float16 sink tokens, coded body, an 8-bit stage for a key block still filling,
and a float16 window of recent tokens. `update` returns the decoded history
followed by the new states as given, so the tokens of one forward call attend
to each other exactly and to everything before them through the compressed
cache (as in KIVI and transformers' QuantizedCache).

With `attend="fused"` (what the registered int methods set when given the
model), a call of at most `FUSED_QUERIES` tokens on the CPU gets `SplitStates`
instead: a compiled kernel reads the integer-coded body in place
(attention/packed.py) and nothing of the history is decoded. The model must use
the "kvshrink" attention (`attention.paged.use_kvshrink_attention`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .codecs.base import Codec
from .codecs.quant import IntQuant
from .errors import KvshrinkError
from .models import ModelSpec, spec_from_config
from .store import TokenStore

FP16_BYTES = 2
FUSED_QUERIES = 8  # longer calls (prefill, perplexity chunks) decode once and attend
ATTENDS = ("fused", "decode")


def coder_pool():
    """The one worker thread a cache hands its filled blocks to (background coding)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvshrink-coder")


def stage_codec(codec: Codec) -> Codec:
    """Per-token codes for a block still filling: twice the block codec's bits, at most 8,
    so re-coding the finished block adds little to its own error."""
    return IntQuant(min(8, 2 * getattr(codec, "bits", 4)), "token")


def _stage_for(codec: Codec) -> Codec | None:
    # per-token codecs stage their own codes; only whole-block codecs need a stage codec
    return stage_codec(codec) if codec.block_tokens > 1 else None


def check_layout(key_codec: Codec, value_codec: Codec, sink, window, block) -> None:
    for name, val in (("sink", sink), ("window", window)):
        if not isinstance(val, int) or val < 0:
            raise KvshrinkError(f"{name} must be a non-negative integer, got {val!r}")
    if not isinstance(block, int) or block < 1:
        raise KvshrinkError(f"block must be a positive integer, got {block!r}")
    for codec in (key_codec, value_codec):
        if block % codec.block_tokens:
            raise KvshrinkError(f"block {block} is not a multiple of {codec.describe()}'s {codec.block_tokens} tokens")


class StoreLayer(CacheLayerMixin):
    """What every kvshrink layer shares: a full-attention layer whose batch operations map
    over the tensors and packed blocks it holds (`_batch_map`)."""

    is_sliding = False
    is_croppable = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self):  # the stores live where they were computed
        pass

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise KvshrinkError("crop takes a negative number of tokens to remove, as DynamicCache does")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._keep_first(max(self.get_seq_length() + tokens_to_remove, 0))

    def _keep_first(self, keep: int) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_map(lambda t: t.index_select(0, beam_idx.to(t.device)), lambda p: p.select_batch(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self._batch_map(lambda t: t.index_select(0, idx.to(t.device)), lambda p: p.select_batch(idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_map(lambda t: t.repeat_interleave(repeats, 0), lambda p: p.repeat_batch(repeats))

    def _batch_map(self, on_tensor, on_packed) -> None:
        raise NotImplementedError


class ByteAccounting:
    """Cache-level bytes, summed over layers that report their own (DESIGN.md ratio)."""

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (payload, scales, minimums, sink, window)."""
        return sum(layer.nbytes() for layer in self.layers)

    def fp16_nbytes(self) -> int:
        return sum(layer.fp16_nbytes() for layer in self.layers)

    def compression_ratio(self) -> float:
        """float16 bytes for the same tokens / bytes really held (DESIGN.md)."""
        held = self.nbytes()
        return self.fp16_nbytes() / held if held else float("nan")


class CompressedLayer(StoreLayer):
    """One layer's compressed keys and values."""

    fused = False  # set by CompressedCache(attend="fused")
    splits = 4
    kernel_reads = False  # fused, on the CPU, and codes the kernel reads: fixed at the first update
    body_reads_stage = False  # the kernel reads the stage's codes too (else decoded into the dense part)

    def __init__(self, key_codec: Codec, value_codec: Codec, sink: int, window: int, block: int):
        super().__init__()
        self.k = TokenStore(key_codec, sink, window, block, _stage_for(key_codec))
        self.v = TokenStore(value_codec, sink, window, block, _stage_for(value_codec))
        self.block = block

    # --- transformers layer API -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.fused:
            self.kernel_reads = key_states.device.type == "cpu" and self._kernel_supports(key_states.shape[-1])
        self.k.init(key_states)
        self.v.init(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if len(self.k) == 0:
            self.k.append(key_states)
            self.v.append(value_states)
            return key_states, value_states
        short = key_states.shape[2] <= FUSED_QUERIES  # a decode step: its tokens wait in float16 (store.py)
        if short and self._readable():
            states = self._split_states(key_states, value_states)
            self.k.append(key_states, defer=True)
            self.v.append(value_states, defer=True)
            return states, states
        keys = self.k.decoded(key_states.dtype, then=key_states)
        values = self.v.decoded(value_states.dtype, then=value_states)
        self.k.append(key_states, defer=short)
        self.v.append(value_states, defer=short)
        return keys, values

    def _kernel_supports(self, head_dim: int) -> bool:
        from .attention.packed import supported

        return supported(self.k.codec, self.v.codec, head_dim)

    def _body(self):
        """The coded tokens as the kernel reads them (None when there are none)."""
        from .attention.packed import IntBody

        if self.k.body is None:
            return None
        return IntBody(self.k.body, self.v.body, self.k.codec, self.v.codec, self.block)

    def _readable(self) -> bool:
        """Whether the kernel can read this layer now: `kernel_reads`, and keys and values with bodies
        of the same tokens (both stores keep whole blocks in the body)."""
        return self.kernel_reads and self.k._n(self.k.body) == self.v._n(self.v.body)

    def _split_states(self, key_states, value_states):
        """Sink, the coded body read in place, then the stage (decoded: under one block), the float16
        tokens of decode steps, the window and this call's tokens as dense tensors."""
        from .attention.split import SplitStates

        after = []
        for store, new in ((self.k, key_states), (self.v, value_states)):
            staged = store.stage is not None and not self.body_reads_stage
            parts = [store.stage_codec.decode(store.stage, torch.float32)] if staged else []
            after.append(parts + [store.fresh, store.window, new])
        body = self._body()
        return SplitStates((self.k.sink, self.v.sink), body, tuple(after), splits=self.splits)

    def get_seq_length(self) -> int:
        return len(self.k) if self.is_initialized else 0

    def reset(self) -> None:
        self.k.sink = self.v.sink = None
        self.is_initialized = False

    def _keep_first(self, keep: int) -> None:
        self.k.crop(keep)
        self.v.crop(keep)

    def _batch_map(self, on_tensor, on_packed) -> None:
        self.k.map_batch(on_tensor, on_packed)
        self.v.map_batch(on_tensor, on_packed)

    # --- accounting ---------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds."""
        return self.k.tensors() + self.v.tensors()

    def nbytes(self) -> int:
        return self.k.nbytes() + self.v.nbytes()

    def fp16_nbytes(self) -> int:
        """What a float16 cache would hold for the same tokens (keys and values)."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.k.sink.shape
        return 2 * b * h * self.get_seq_length() * d * FP16_BYTES


class CompressedCache(ByteAccounting, Cache):
    """A transformers `Cache` of `CompressedLayer`s, one per decoder layer.

    Build it from a registered method name (`from_method("int4", model.config)`)
    or from codec objects (`CompressedCache(config, key_codec=IntQuant(...))`).
    """

    layer_cls = CompressedLayer

    def __init__(
        self,
        config=None,
        key_codec: Codec | None = None,
        value_codec: Codec | None = None,
        sink: int = 4,
        window: int = 0,
        block: int = 128,
        num_layers: int | None = None,
        method: str | None = None,
        layer_codecs: list | None = None,
        attend: str = "decode",
        splits: int = 4,
        background: bool = False,
    ):
        """layer_codecs: one (key codec, value codec) per layer, for codecs learned per layer
        (RVQ codebooks); otherwise every layer uses key_codec / value_codec.
        attend: "decode" (decode the history, then attend) or "fused" (decode steps read integer
        codes in place; the model must use the "kvshrink" attention); splits: parallel ranges of
        blocks per head in the fused kernel; background: blocks filled by decode steps are coded
        on a worker thread (store.py), off the critical path."""
        if attend not in ATTENDS:
            raise KvshrinkError(f"unknown attend {attend!r}; use one of {', '.join(ATTENDS)}")
        if not isinstance(splits, int) or splits < 1:
            raise KvshrinkError(f"splits must be a positive integer, got {splits!r}")
        if layer_codecs is None:
            if key_codec is None:
                raise KvshrinkError("CompressedCache needs a key codec (or use CompressedCache.from_method)")
            value_codec = value_codec or key_codec
        else:
            key_codec, value_codec = layer_codecs[0]
        for kc, vc in layer_codecs or [(key_codec, value_codec)]:
            check_layout(kc, vc, sink, window, block)
        self.spec: ModelSpec | None = spec_from_config(config) if config is not None else None
        if num_layers is None:
            if self.spec is None:
                raise KvshrinkError("CompressedCache needs a model config or num_layers")
            num_layers = self.spec.num_layers
        if layer_codecs is not None and len(layer_codecs) != num_layers:
            raise KvshrinkError(f"{len(layer_codecs)} per-layer codecs for a model of {num_layers} layers")
        self.method = method
        self.key_codec, self.value_codec = key_codec, value_codec
        self.sink, self.window, self.block = sink, window, block
        pairs = layer_codecs or [(key_codec, value_codec)] * num_layers
        layers = [self.layer_cls(kc, vc, sink, window, block) for kc, vc in pairs]
        self.attend = attend
        self.background = bool(background)
        if background:
            pool = coder_pool()
            for layer in layers:
                layer.k.executor = layer.v.executor = pool
        if attend == "fused":
            from .attention.packed import supported

            for kc, vc in pairs:
                if not supported(kc, vc):
                    raise KvshrinkError(f"no fused kernel reads {kc.describe()} / {vc.describe()}; use attend='decode'")
            for layer in layers:
                layer.fused, layer.splits = True, splits
        super().__init__(layers=layers)

    @classmethod
    def from_method(cls, name: str, config, **overrides) -> "CompressedCache":
        """A cache for a registered method name (see `kvshrink.methods`)."""
        from .methods import get_method

        return get_method(name).make_cache(config, **overrides)

    @staticmethod
    def load(path: str, model) -> "CompressedCache":
        """A cache saved with `cache.save(path)`, checked against `model` (cache_io.py)."""
        from .cache_io import load

        return load(path, model)

    def describe(self) -> str:
        return (
            f"keys {self.key_codec.describe()}, values {self.value_codec.describe()}, "
            f"sink {self.sink}, window {self.window}, block {self.block}, "
            + self._how_it_attends()
            + (", blocks coded in the background" if self.background else "")
        )

    def _how_it_attends(self) -> str:
        return "fused decode attention" if self.attend == "fused" else "decode-then-attend"
