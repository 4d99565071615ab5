"""CompressedCache: every layer's keys and values in a `TokenStore` (core/store.py), coded by any codec.

Float16 sink tokens, a coded body, a per-token stage for a key block still filling, and a float16
window of recent tokens. `update` returns the decoded history followed by the new states as
given, so the tokens of one forward call attend to each other exactly and to everything before
them through the compressed cache (as in KIVI and transformers' QuantizedCache).

With `attend="fused"` (what the int methods use on a prepared model), a call of at most
`FUSED_QUERIES` tokens on the CPU gets `SplitStates` instead: a compiled kernel reads the
integer-coded body in place (kernel.py) and nothing of the history is decoded.
"""

from __future__ import annotations

import copy

import torch

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention, uses_kvshrink_attention
from ...attention.split import SplitStates
from ...codecs.base import Codec, Fp16, tensor_nbytes
from ...codecs.joint import JointKeys
from ...codecs.quant import IntQuant
from ...codecs.vector import VectorQuant
from ...core.cache import KVCache
from ...core.heads import HeadGroups, heads_of
from ...core.layer import ATTENDS, FUSED_QUERIES, StoreLayer, check_layout, coder_pool, stage_for
from ...core.store import TokenStore
from ...errors import KvshrinkError
from ...kernels.backend import kernels_on
from ...spec import spec_from_config
from .config import Fp16Config, QuantConfig
from .kernel import IntBody, stage_supported, supported


# Decode tokens wait in float16 in runs of this many, then are staged as codes (core/store.py): a
# decoding int4 sequence held up to 1.77 MB more than a prompt of its length when a whole block's
# worth waited, 0.12 MB with 8 (docs/serve.md); decode speed at 8k did not change.
GATHER = 8


class CompressedLayer(StoreLayer):
    """One layer's compressed keys and values."""

    fused = False  # set by CompressedCache(attend="fused")
    splits = 4
    kernel_reads = False  # fused, on the CPU, and codes the kernel reads: fixed at the first update
    body_reads_stage = False  # the kernel reads the stage's codes too (else decoded into the dense part): fixed at the first update
    window_codes_read = False  # the kernel can read a coded window's codes (where it reads the stage): fixed likewise
    layout, gpu_kernel = "int", True  # the body's kind, and whether a Triton kernel reads it (CUDA)
    gather = GATHER  # decode tokens staged as codes together (core/store.py)
    saved_by_stores = True

    def __init__(self, key_codec: Codec, value_codec: Codec, sink: int, window: int, block: int):
        super().__init__()
        self.k = TokenStore(key_codec, sink, window, block, self.stage_codec(key_codec), gather=self.gather)
        self.v = TokenStore(value_codec, sink, window, block, self.stage_codec(value_codec), gather=self.gather)
        self.block = block

    def stage_codec(self, codec: Codec) -> Codec | None:
        """How an unfinished block waits (core/layer.py's rule: two bits more, rotated; a family may differ)."""
        return stage_for(codec)

    # --- transformers layer API -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._init_shape(key_states)
        if self.fused:
            # no Triton kernel reads joint-basis keys or vector-level values: said once, then decoded
            joint = isinstance(self.k.codec, JointKeys)
            vector = isinstance(self.v.codec, VectorQuant)
            layout = "joint-basis key" if joint else "vector-level value" if vector else self.layout
            self.kernel_reads = (kernels_on(key_states.device, layout, self.gpu_kernel and not (joint or vector))
                                 and self._kernel_supports(key_states.shape[-1]))
            self.body_reads_stage = self.kernel_reads and self._reads_stage(key_states)
            self.window_codes_read = (self.body_reads_stage and self.k.window_codec is not None
                                      and stage_supported(self.k.window_codec, key_states.shape[-1]))
        self.k.init(key_states)
        self.v.init(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, checked=None, **kwargs):
        """checked: None, or the states already through `half_checked` (keys, values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # a decode step (not the first call): its tokens wait in float16 (core/store.py)
        held = len(self.k)
        short = key_states.shape[2] <= FUSED_QUERIES and held > 0
        if held == 0:
            out = key_states, value_states
        elif short and self._readable():
            out = (self._split_states(key_states, value_states),) * 2
        else:
            out = (self.k.decoded(key_states.dtype, then=key_states),
                   self.v.decoded(value_states.dtype, then=value_states))
        k, v = checked or (key_states, value_states)
        self.k.append(k, defer=short, checked=checked is not None)
        self.v.append(v, defer=short, checked=checked is not None)
        self._slide()
        return out

    def _kernel_supports(self, head_dim: int) -> bool:
        return supported(self.k.codec, self.v.codec, head_dim)

    def _reads_stage(self, states: torch.Tensor) -> bool:
        """Whether the kernel reads the stage's codes in place (both kernels do, for the codecs the numba one reads)."""
        return stage_supported(self.k.stage_codec, states.shape[-1])

    def _body(self):
        """The coded tokens as the kernel reads them, the stage's after the body's where it reads them
        (None when the body holds none)."""
        if not self.k.body_tokens():
            return None
        stage = None
        if self.body_reads_stage and self._stages_alike():
            stage = (self.k.stage, self.v.stage, self.k.stage_codec)
        window = (self.k.window, self.v.window, self.k.window_codec) if self._reads_window() else None
        return IntBody(self.k.body_parts(), self.v.body_parts(), self.k.codec, self.v.codec, self.block, stage, window)

    def _stages_alike(self) -> bool:
        """Whether keys and values stage the same tokens, as the kernel reads them. After a crop into a block they
        differ for a while: the keys' kept tokens wait in float16 (their codes span the block), the values' stay in
        their per-token codes; both are then decoded into the dense tokens, in order."""
        return self.k.stage is not None and self.k.tokens_in(self.k.stage) == self.v.tokens_in(self.v.stage)

    def _reads_window(self) -> bool:
        """Whether the kernel reads the coded window in place, after the stage: where it reads the stage, and no
        float16 token waits between them (the kernel's tokens must keep their order for a mask)."""
        return (self.body_reads_stage and self.window_codes_read and self.k.window is not None
                and self.v.window is not None and not self.k.fresh.shape[-2] and not self.v.fresh.shape[-2])

    def _readable(self) -> bool:
        """Whether the kernel can read this layer now: `kernel_reads`, and keys and values with bodies
        of the same tokens (both stores keep whole blocks in the body)."""
        return (self.kernel_reads and self.k.body_tokens() == self.v.body_tokens())

    def _split_states(self, key_states, value_states):
        """Sink, the coded body read in place, then the stage (decoded: under one block), the float16
        tokens of decode steps, the window and this call's tokens as dense tensors."""
        body = self._body()  # first: joining a forked store's shared blocks finishes its background coding
        after = []
        window_read = getattr(body, "window", None) is not None  # IntBody's; other families' bodies have none
        # the body reads the stages only where they hold the same tokens (`_stages_alike`); else they are dense
        stage_read = self.body_reads_stage and body is not None and self._stages_alike()
        for store, new in ((self.k, key_states), (self.v, value_states)):
            staged = store.stage is not None and not stage_read
            parts = [store.stage_codec.decode(store.stage, torch.float32)] if staged else []
            recent = store.tail if window_read else store.window_dense()
            after.append(parts + [store.fresh, recent, new])
        return SplitStates((self.k.sink, self.v.sink), body, tuple(after), splits=self.splits)

    def held(self) -> int:
        return len(self.k) if self.is_initialized else 0

    def stores(self) -> list:
        return [self.k, self.v]

    def reset(self) -> None:
        self.k.sink = self.v.sink = None
        self.is_initialized = False

    def _keep_first(self, keep: int) -> None:
        self.k.crop(keep)
        self.v.crop(keep)

    def _batch_map(self, on_tensor, on_packed) -> None:
        self.k.map_batch(on_tensor, on_packed)
        self.v.map_batch(on_tensor, on_packed)

    def tensors(self) -> list[torch.Tensor]:
        return self.k.tensors() + self.v.tensors()


class CompressedCache(KVCache):
    """A transformers `Cache` of `CompressedLayer`s, one per decoder layer.

    Build it from a registered method name (`kvshrink.from_method("int4", model)`)
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
        window_codec: Codec | None = None,
    ):
        """layer_codecs: one (key codec, value codec) per layer, for codecs learned per layer
        (RVQ codebooks), or a list of (first, stop, key codec, value codec) runs of KV heads for a layer whose
        heads are coded apart (core/heads.py); otherwise every layer uses key_codec / value_codec.
        attend: "decode" (decode the history, then attend) or "fused" (decode steps read integer
        codes in place; the model must use the "kvshrink" attention); splits: parallel ranges of
        blocks per head in the fused kernel; background: blocks filled by decode steps are coded
        on a worker thread (core/store.py), off the critical path; window_codec: per-token codes the
        window's tokens are held in (None: float16)."""
        if attend not in ATTENDS:
            raise KvshrinkError(f"unknown attend {attend!r}; use one of {', '.join(ATTENDS)}")
        if not isinstance(splits, int) or splits < 1:
            raise KvshrinkError(f"splits must be a positive integer, got {splits!r}")
        if layer_codecs is None:
            if key_codec is None:
                raise KvshrinkError("CompressedCache needs a key codec (or use CompressedCache.from_method)")
            value_codec = value_codec or key_codec
        else:
            key_codec, value_codec = _pairs(layer_codecs[0])[0]
        every = [p for entry in layer_codecs or [(key_codec, value_codec)] for p in _pairs(entry)]
        for kc, vc in every:
            check_layout(kc, vc, sink, window, block)
        if num_layers is None:
            if config is None:
                raise KvshrinkError("CompressedCache needs a model config or num_layers")
            num_layers = spec_from_config(config).num_layers
        if layer_codecs is not None and len(layer_codecs) != num_layers:
            raise KvshrinkError(f"{len(layer_codecs)} per-layer codecs for a model of {num_layers} layers")
        self.key_codec, self.value_codec = key_codec, value_codec
        self.sink, self.window, self.block = sink, window, block
        pairs = layer_codecs or [(key_codec, value_codec)] * num_layers
        layers = [self._layer(entry, sink, window, block) for entry in pairs]
        parts = [p for layer in layers for p in layer.layer_parts()]
        self.window_codec = window_codec
        if window_codec is not None:
            for layer in parts:
                layer.k.code_window(window_codec)
                layer.v.code_window(window_codec)
        self.attend = attend
        self.background = bool(background)
        if background:
            pool = coder_pool()
            for layer in parts:
                layer.k.executor = layer.v.executor = pool
        if attend == "fused":
            for kc, vc in every:
                if not supported(kc, vc):
                    raise KvshrinkError(f"no fused kernel reads {kc.describe()} / {vc.describe()}; use attend='decode'")
            for layer in parts:
                layer.fused, layer.splits = True, splits
        super().__init__(layers, config, method)

    def _layer(self, entry, sink: int, window: int, block: int):
        """A layer of `layer_cls` for a (key codec, value codec) pair; a HeadGroups of them for runs of heads."""
        if isinstance(entry, list):
            return heads_of([self.layer_cls(kc, vc, sink, window, block) for _, _, kc, vc in entry],
                            [(a, b) for a, b, _, _ in entry])
        return self.layer_cls(*entry, sink, window, block)

    def layer_parts(self) -> list:
        """Every layer that holds tokens: a layer in head groups gives its parts (core/heads.py)."""
        return [p for layer in self.layers for p in layer.layer_parts()]

    def nbytes(self) -> int:
        """Every tensor the layers hold, each storage once: code tables that the layers' codecs share
        (entropy-coded keys, codecs/jointcoded.py) count once a cache, not once a layer."""
        self.settle()
        return tensor_nbytes([t for layer in self.layers for t in layer.tensors()])

    def decoding_copy(self) -> CompressedCache:
        """A copy that reads the same codes by decoding them, then attending (attend="decode"): the
        reference of the fused path on one set of codes. Two caches filled separately can differ by a
        code that float rounding upstream (1e-7) moved across a level, which is not the kernel's doing."""
        if self.background:
            raise KvshrinkError("a cache that codes blocks in the background cannot be copied; settle it first")
        other = copy.deepcopy(self)
        other.attend = "decode"
        for layer in other.layer_parts():
            layer.fused = layer.kernel_reads = layer.body_reads_stage = False
        return other

    def head_agnostic(self) -> bool:
        # int and float16 codes treat every head alike; joint-basis keys, learned codebooks and head groups do not
        return (not any(isinstance(layer, HeadGroups) for layer in self.layers)
                and all(type(c) in (IntQuant, Fp16) for layer in self.layers for c in (layer.k.codec, layer.v.codec)))

    def settle(self) -> None:
        """Take the bodies the coder thread built (background coding)."""
        for layer in self.layer_parts():
            layer.k.settle()
            layer.v.settle()

    def _describe(self) -> str:
        return (
            f"keys {self.key_codec.describe()}, values {self.value_codec.describe()}, "
            f"sink {self.sink}, window {self.window}{self._window_code()}, block {self.block}, "
            + self._how_it_attends()
            + (", blocks coded in the background" if self.background else "")
        )

    def _window_code(self) -> str:
        return f" ({self.window_codec.describe()})" if self.window and self.window_codec is not None else ""

    def _how_it_attends(self) -> str:
        return "fused decode attention" if self.attend == "fused" else "decode-then-attend"


def build(config: QuantConfig | Fp16Config, target, method: str) -> CompressedCache:
    """The cache of an int or fp16 method for a model or its config. attend="auto": fused where the
    model uses the kvshrink attention (`kvshrink.prepare`), else decode-then-attend; `describe()`
    says which."""
    model_config = getattr(target, "config", target)
    if isinstance(config, Fp16Config):
        return CompressedCache(model_config, key_codec=Fp16(), sink=0, window=0, block=config.block, method=method)
    attend = config.attend
    if attend == "auto":
        attend = "fused" if uses_kvshrink_attention(model_config) else "decode"
    elif attend == "fused":
        require_kvshrink_attention(model_config, method)
    key_group = config.block if config.key_axis == "channel" else None
    rope = spec_from_config(model_config).rope if config.prerope else ()
    if config.prerope and not rope:
        raise KvshrinkError(f"{method}: prerope keys need a model with rotary position embeddings")
    keys = IntQuant(config.bits, config.key_axis, key_group, rotate=config.rotate, seed=1, levels=config.levels,
                    derope=rope, scales=config.scales)
    values = IntQuant(config.bits, "token", config.value_group, rotate=config.rotate, seed=2, levels=config.levels,
                      scales=config.scales)
    return CompressedCache(model_config, key_codec=keys, value_codec=values, sink=config.sink, window=config.window,
                           block=config.block, attend=attend, splits=config.splits, background=config.background,
                           method=method)


def prepare(config, model, tokenizer=None, corpus=None):
    """Fused decode attention reads the codes through the "kvshrink" attention: switch the model to it
    (plain SDPA for every other cache), in place."""
    if getattr(config, "attend", "decode") != "decode":
        use_kvshrink_attention(model)
    return model


def _pairs(entry) -> list:
    """The (key codec, value codec) pairs of one layer's entry of `layer_codecs`."""
    return [(kc, vc) for _, _, kc, vc in entry] if isinstance(entry, list) else [tuple(entry)]
