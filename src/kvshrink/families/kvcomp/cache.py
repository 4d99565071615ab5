"""KVCompCache: error-bounded quantization + entropy coding, decoded inside attention (KVComp).

Per layer: float16 sink tokens, then the coded body (keys in blocks of
`key_block` tokens quantized per channel, values in blocks of `value_block`
tokens quantized per token; body.py), then the float16 recent tokens
that do not fill a value block yet (at least `window` of them stay float16).
Tokens reach the body once a whole value block has gathered, as in the paper.

A call of at most `FUSED_QUERIES` tokens (decoding) gets `SplitStates`
(attention/split.py, kernel in families/kvcomp/kernel.py): the fused kernel decodes each block where it is
consumed. Longer calls (prefill, perplexity chunks) decode the body and attend
(`attend="decode"` does that on every call: the reference). Tokens pass through
float16 before coding, as in every kvshrink store; the error bound is relative
to those float16 values.

`save(path)` / `kvshrink.load_cache(path, model)` (io.py, cache.py) write and read
the coded form itself, so a resumed chat costs a file read, not a prefill.
"""

from __future__ import annotations

import json

import torch

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention
from ...attention.split import SplitStates
from ...codecs.errbound import ErrorBound
from ...codecs.huffman import Table
from ...core.cache import KVCache
from ...core.calibfile import check_header, model_header, read_safetensors
from ...core.layer import ATTENDS, FUSED_QUERIES, StoreLayer, coder_pool
from ...core.store import half_checked
from ...errors import KvshrinkError
from ...spec import spec_from_config
from . import io
from .body import EntropyBody
from .config import KVCompConfig
from .kernel import KVCompBody


class KVCompLayer(StoreLayer):
    def __init__(self, owner: "KVCompCache"):
        super().__init__()
        o = self.owner = owner
        self.kb = EntropyBody(ErrorBound(o.key_bound, "channel"), o.key_block, o.entropy, o.drift)
        self.vb = EntropyBody(ErrorBound(o.value_bound, "token"), o.value_block, o.entropy, o.drift)
        self.sink = self.recent = None  # (keys, values) float16
        self._pending = None  # (future, tokens): value blocks being coded in the background

    def lazy_initialization(self, key_states, value_states) -> None:
        if key_states.device.type != "cpu":
            raise KvshrinkError("kvcomp caches run on the CPU (their kernels are numba CPU code)")
        e = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3], dtype=torch.float16)
        self.sink, self.recent = (e, e.clone()), (e.clone(), e.clone())
        self._init_shape(key_states)
        self.is_initialized = True

    def _n(self) -> int:
        return self.sink[0].shape[2] + self.kb.num_tokens + self.recent[0].shape[2]

    def settle(self) -> None:
        """Wait for the blocks a worker is coding; they leave the recent tokens."""
        if self._pending is None:
            return
        future, full = self._pending
        self._pending = None
        future.result()
        self.recent = (self.recent[0][:, :, full:].clone(), self.recent[1][:, :, full:].clone())

    def _code(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kb.append(k.float())
        self.vb.append(v.float())

    def _append(self, k: torch.Tensor, v: torch.Tensor, defer: bool = False) -> None:
        """defer: whole value blocks are coded on the cache's worker thread; they stay readable as
        float16 recent tokens until the next call settles them."""
        k16, v16 = half_checked(k), half_checked(v)
        room = self.owner.sink - self.sink[0].shape[2]
        if room > 0:
            self.sink = (torch.cat([self.sink[0], k16[:, :, :room]], 2), torch.cat([self.sink[1], v16[:, :, :room]], 2))
            k16, v16 = k16[:, :, room:], v16[:, :, room:]
        rk, rv = torch.cat([self.recent[0], k16], 2), torch.cat([self.recent[1], v16], 2)
        vbk = self.owner.value_block
        full = max(rk.shape[2] - self.owner.window, 0) // vbk * vbk
        if full and defer and self.owner.pool is not None:
            self._pending = (self.owner.pool.submit(self._code, rk[:, :, :full], rv[:, :, :full]), full)
        elif full:
            self._code(rk[:, :, :full], rv[:, :, :full])
            rk, rv = rk[:, :, full:].clone(), rv[:, :, full:].clone()
        self.recent = (rk, rv)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.settle()
        if self._n() == 0:
            self._append(key_states, value_states)
            return key_states, value_states
        if key_states.shape[2] <= FUSED_QUERIES:
            body = KVCompBody(self.kb.view(), self.vb.view()) if self.kb.num_tokens else None
            after = (torch.cat([self.recent[0].float(), key_states.float()], 2),
                     torch.cat([self.recent[1].float(), value_states.float()], 2))
            states = SplitStates(self.sink, body, after, fused=self.owner.attend == "fused", splits=self.owner.splits)
            self._append(key_states, value_states, defer=True)
            return states, states
        keys, values = self.decoded(key_states.dtype, then=(key_states, value_states))
        self._append(key_states, value_states)
        return keys, values

    def decoded(self, dtype=torch.float32, then: tuple = ()):
        """(keys, values) of every held token in `dtype`, followed by `then` (this call's states)."""
        self.settle()
        ks, vs = [self.sink[0].to(dtype)], [self.sink[1].to(dtype)]
        if self.kb.num_tokens:
            ks.append(self.kb.view().decoded(dtype))
            vs.append(self.vb.view().decoded(dtype))
        ks.append(self.recent[0].to(dtype))
        vs.append(self.recent[1].to(dtype))
        if then:
            ks.append(then[0])
            vs.append(then[1])
        return torch.cat(ks, 2), torch.cat(vs, 2)

    def get_seq_length(self) -> int:
        self.settle()
        return self._n() if self.is_initialized else 0

    def reset(self) -> None:
        self.__init__(self.owner)

    def _keep_first(self, keep: int) -> None:
        """Whole kept blocks stay coded (recoded from their symbols, exactly); the tokens of a cut
        block move into the float16 recent part."""
        k, v = self.decoded(torch.float32)
        n_sink, n_body = self.sink[0].shape[2], self.kb.num_tokens
        blocks = min(max(keep - n_sink, 0), n_body) // self.owner.value_block
        for body in (self.kb, self.vb):
            if body.num_tokens > blocks * self.owner.value_block:  # only a cut body is recoded
                per = self.owner.value_block // body.block
                view = body.view()
                sym = view.symbols()[:, :, :blocks * per]
                body.recode(sym, view.mn[:, :, :blocks * per], view.step[:, :, :blocks * per],
                            view.table_of[:blocks * per])
        start = n_sink + blocks * self.owner.value_block
        self.sink = (self.sink[0][:, :, :keep].clone(), self.sink[1][:, :, :keep].clone())
        self.recent = (k[:, :, start:keep].to(torch.float16), v[:, :, start:keep].to(torch.float16))

    def _batch_map(self, on_tensor, on_packed) -> None:
        self.settle()
        self.sink = tuple(on_tensor(t) for t in self.sink)
        self.recent = tuple(on_tensor(t) for t in self.recent)
        for body in (self.kb, self.vb):
            if body.num_tokens:
                view = body.view()
                body.recode(on_tensor(view.symbols()), on_tensor(view.mn), on_tensor(view.step), view.table_of)

    # --- accounting ---------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        self.settle()
        if not self.is_initialized:
            return []
        return [*self.sink, *self.recent, *self.kb.tensors(), *self.vb.tensors()]


class KVCompCache(KVCache):
    """A transformers `Cache` of `KVCompLayer`s; see the module docstring.

    key_bound / value_bound: relative error bounds; key_block / value_block: tokens per coded
    block (value_block a multiple of key_block); entropy=False keeps fixed-width packed codes;
    drift: the table refresh threshold; splits: parallel ranges per head in the fused kernel;
    background: value blocks filled by decode steps are coded on a worker thread, off the
    critical path (the next call waits for them: results do not depend on the thread's timing).
    """

    can_save = True

    def __init__(self, config=None, key_bound: float = 0.1, value_bound: float = 0.1, key_block: int = 64,
                 value_block: int = 128, sink: int = 4, window: int = 0, entropy: bool = True,
                 drift: float = 0.05, attend: str = "fused", splits: int = 4, background: bool = True,
                 num_layers: int | None = None, method: str | None = None):
        for name, val, low in (("key_block", key_block, 1), ("value_block", value_block, 1), ("sink", sink, 0),
                               ("window", window, 0), ("splits", splits, 1)):
            if not isinstance(val, int) or val < low:
                raise KvshrinkError(f"{name} must be an integer >= {low}, got {val!r}")
        if value_block % key_block:
            raise KvshrinkError(f"value_block {value_block} is not a multiple of key_block {key_block}")
        if attend not in ATTENDS:
            raise KvshrinkError(f"unknown attend {attend!r}; use one of {', '.join(ATTENDS)}")
        if not isinstance(drift, (int, float)) or drift < 0:
            raise KvshrinkError(f"drift must be a non-negative number, got {drift!r}")
        ErrorBound(key_bound, "channel"), ErrorBound(value_bound, "token")  # refuse impossible bounds now
        if num_layers is None:
            if config is None:
                raise KvshrinkError("KVCompCache needs a model config or num_layers")
            num_layers = spec_from_config(config).num_layers
        if config is not None and attend == "fused":
            require_kvshrink_attention(config, method or "a kvcomp cache")
        self.key_bound, self.value_bound = float(key_bound), float(value_bound)
        self.key_block, self.value_block = key_block, value_block
        self.sink, self.window, self.block = sink, window, value_block
        self.entropy, self.drift, self.attend, self.splits = bool(entropy), float(drift), attend, splits
        self.background = bool(background)
        self.pool = coder_pool() if background else None  # decode steps hand filled value blocks to it
        self.model_header = None  # set by `build`: cache.save(path) names the model
        super().__init__([KVCompLayer(self) for _ in range(num_layers)], config, method)

    def describe(self) -> str:
        coder = "Huffman" if self.entropy else "fixed-width packed"
        return (f"keys eb {self.key_bound} per channel in blocks of {self.key_block}, values eb {self.value_bound} "
                f"per token in blocks of {self.value_block}, {coder} codes, sink {self.sink}, window {self.window}, "
                f"{self.attend} decode attention")

    def save(self, path: str, model=None, ids=None) -> int:
        """Write the coded cache to `path` (safetensors), with the token ids it holds when given;
        returns the file's size in bytes (io.py)."""
        return io.save(self, path, model, ids)

    def coding_stats(self) -> dict:
        """Bits per symbol of the codes against the Shannon limit, keys and values over all layers."""
        out = {}
        for name in ("kb", "vb"):
            st = [getattr(layer, name).stats() for layer in self.layers if layer.is_initialized]
            n = sum(s["symbols"] for s in st)
            if not n:
                continue
            bits = sum(s["bits_per_symbol"] * s["symbols"] for s in st) / n
            ent = sum(s["entropy_bits_per_symbol"] * s["symbols"] for s in st) / n
            out["keys" if name == "kb" else "values"] = {
                "bits_per_symbol": bits, "entropy_bits_per_symbol": ent, "symbols": n,
                "tables": sum(s["tables"] for s in st)}
        return out


def load(path: str, model) -> KVCompCache:
    """A KVCompCache read from `path` (written by `cache.save`), checked against `model`, which must
    use the kvshrink attention (`kvshrink.prepare(model, "kvcomp-eb0.1")`)."""
    tensors, meta = read_safetensors(path, io.FORMAT, "cache file", "a kvshrink cache")
    check_header(json.loads(meta["header"]), model, "", what=f"cache file {path!r}")
    settings = json.loads(meta["settings"])
    cache = KVCompCache(model.config, **settings)
    cache.model_header = json.loads(meta["header"])
    cache.ids = tensors.get("ids")
    layers = json.loads(meta["layers"])
    if len(layers) != len(cache.layers):
        raise KvshrinkError(f"cache file {path!r} has {len(layers)} layers, the model {len(cache.layers)}")
    for i, (layer, lm) in enumerate(zip(cache.layers, layers)):
        if lm is None:
            continue
        p = f"{i}."
        layer.sink = (tensors[p + "sink.k"], tensors[p + "sink.v"])
        layer.recent = (tensors[p + "recent.k"], tensors[p + "recent.v"])
        layer.dtype, layer.device = torch.float32, layer.sink[0].device
        b, h, _, d = layer.sink[0].shape
        layer.kv_shape = (b, h, d)
        layer.is_initialized = True
        for name, body in (("kb", layer.kb), ("vb", layer.vb)):
            bm = lm[name]
            body.head_dim, body.payload_bits, body.entropy_total = bm["head_dim"], bm["payload_bits"], bm["entropy"]
            body.symbols = bm["symbols"]
            if f"{p}{name}.stream" not in tensors:
                continue
            for t in tensors[f"{p}{name}.lengths"].numpy():
                body._add(Table(t))
            for field in ("stream", "starts", "table_of", "mn", "step"):
                setattr(body, field, tensors[f"{p}{name}.{field}"])
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
    cache.model_header = model_header(model)  # for cache.save(path): the file names its model
    return cache


def prepare(config: KVCompConfig, model, tokenizer=None, corpus=None):
    """Decode steps attend through the cache's own states: the model uses the "kvshrink" attention."""
    use_kvshrink_attention(model)
    return model
