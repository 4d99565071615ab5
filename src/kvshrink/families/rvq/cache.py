"""CodedCache: a CompressedCache whose decode steps attend from the codes.

For codecs that can score keys and sum values without decoding them (RVQ:
`key_scores` / `value_sums`), a call of at most `CODE_DOMAIN_QUERIES` tokens
gets states that attend from the codes instead of the decoded history: with
`fused=True` on the CPU, `SplitStates` over the compiled kernel
(kernel.py); otherwise `CodedStates` (families/rvq/states.py, PyTorch); longer
calls (prefill, perplexity chunks) decode and attend as every CompressedCache
does. `code_domain=False` keeps decode-then-attend everywhere (the reference
the bench and the tests compare against). The model must use the "kvshrink"
attention (`kvshrink.prepare(model, "rvq-d4")` switches it).
"""

from __future__ import annotations

import os
import weakref

from ...attention.function import require_kvshrink_attention, use_kvshrink_attention
from ...codecs.rvq import RVQ
from ...errors import KvshrinkError
from ..quant.cache import CompressedCache, CompressedLayer
from . import calibrate
from .config import LAYOUT, RvqConfig
from .kernel import RVQBody, supported
from .states import CodedStates

CODE_DOMAIN_QUERIES = 8
BLOCK = 64  # tokens per body append: a per-token codec moves staged codes into the body in runs of this


class CodedLayer(CompressedLayer):
    code_domain = True

    def _kernel_supports(self, head_dim: int) -> bool:
        return supported(self.k.codec, self.v.codec, head_dim)

    def _reads_stage(self, states) -> bool:
        return True  # per-token codes: the stage is read in place after the body, on either kernel
    layout = "RVQ"

    def _body(self):
        segments = [(k, v) for k, v in ((self.k.body, self.v.body), (self.k.stage, self.v.stage)) if k is not None]
        return RVQBody(segments, self.k.codec, self.v.codec, self.block) if segments else None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.is_initialized and self.kernel_reads:  # the compiled kernel (CompressedLayer.update)
            return super().update(key_states, value_states, *args, **kwargs)
        if not (self.code_domain and self.is_initialized and len(self.k)
                and key_states.shape[2] <= CODE_DOMAIN_QUERIES):
            return super().update(key_states, value_states, *args, **kwargs)
        dtype = key_states.dtype
        parts = []
        for (k, kc), (v, _) in zip(self.k.parts(), self.v.parts()):
            if kc is None:
                if k.shape[2]:
                    parts.append((k.to(dtype), v.to(dtype)))
            else:
                parts.append((k, v))
        parts.append((key_states, value_states))  # this call's tokens, exact
        states = CodedStates(parts, self.k.codec, self.v.codec)
        self.k.append(key_states, defer=True)  # decode steps: tokens wait in float16 (core/store.py)
        self.v.append(value_states, defer=True)
        return states, states


class CodedCache(CompressedCache):
    """CompressedCache with code-domain decode attention (see the module doc)."""

    layer_cls = CodedLayer

    def __init__(self, *args, code_domain: bool = True, fused: bool = False, **kwargs):
        """fused: decode steps on the CPU use the compiled kernel (kernel.py) where it reads
        the codes; code_domain: otherwise attend from the codes with PyTorch (states.py);
        neither: decode the history, then attend."""
        super().__init__(*args, **kwargs)
        if fused and not code_domain:
            raise KvshrinkError("the fused kernel attends from the codes: it needs code_domain=True")
        self.attend = "fused" if fused else "codes" if code_domain else "decode"
        for layer in self.layers:
            codecs = (layer.k.codec, layer.v.codec)
            if code_domain and not all(hasattr(c, "key_scores") and hasattr(c, "value_sums") for c in codecs):
                raise KvshrinkError(f"{codecs[0].describe()} cannot attend from its codes; use code_domain=False")
            if code_domain and any(c.block_tokens > 1 for c in codecs):
                raise KvshrinkError("code-domain attention needs per-token codecs")
            layer.code_domain = code_domain
            layer.fused = fused
        self.code_domain = code_domain

    def _how_it_attends(self) -> str:
        if self.attend == "fused":
            return ("fused decode attention (numba kernel on the CPU, Triton on CUDA, where it reads the codes; "
                    "PyTorch from the codes otherwise)")
        return "attention from the codes (PyTorch)" if self.attend == "codes" else "decode-then-attend"


_CALIBS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {layout: calibration}


def calibration_for(model, tokenizer=None, corpus=None, **layout):
    """The model's codebooks for this layout: memo, else the saved file, else learned (needs the tokenizer)."""
    layout = {**LAYOUT, **{k: v for k, v in layout.items() if k in LAYOUT}}
    memo = _CALIBS.setdefault(model, {})
    key = tuple(layout[k] for k in LAYOUT)
    if key not in memo:
        path = calibrate.default_path(model, **layout)
        if tokenizer is None:
            if not os.path.isfile(path):
                raise KvshrinkError(f"no RVQ codebooks for this model and layout at {path}: run "
                                    f"`kvshrink calibrate --method rvq --group {layout['group']}` first")
            memo[key] = calibrate.RvqCalibration.load(path, model)
        else:
            memo[key] = calibrate.load_or_calibrate(model, tokenizer, corpus, **layout)
    return memo[key]


def _layout(config: RvqConfig) -> dict:
    return {k: getattr(config, k) for k in LAYOUT}


def prepare(config: RvqConfig, model, tokenizer=None, corpus=None):
    """Codebooks learned or loaded once per model and layout (a few minutes the first time on the
    bundled model); the model switched to the "kvshrink" attention in place."""
    calibration_for(model, tokenizer, corpus, **_layout(config))
    use_kvshrink_attention(model)
    return model


def build(config: RvqConfig, model, method: str) -> CodedCache:
    if not hasattr(model, "set_attn_implementation"):
        raise KvshrinkError(f"{method} needs the model, not its config (its codebooks belong to the weights): "
                            f"kvshrink.from_method({method!r}, model)")
    if config.attend != "decode":
        require_kvshrink_attention(model.config, method)
    calib = calibration_for(model, **_layout(config))
    codecs = [(RVQ(k, config.key_grouping, config.depth), RVQ(v, config.value_grouping, config.depth))
              for k, v in zip(calib.keys, calib.values)]
    return CodedCache(model.config, layer_codecs=codecs, sink=config.sink, window=config.window, block=BLOCK,
                      code_domain=config.attend != "decode", fused=config.attend == "fused", method=method)
