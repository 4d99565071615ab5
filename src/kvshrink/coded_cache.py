"""CodedCache: a CompressedCache whose decode steps attend from the codes.

For codecs that can score keys and sum values without decoding them (RVQ:
`key_scores` / `value_sums`), a call of at most `CODE_DOMAIN_QUERIES` tokens
gets states that attend from the codes instead of the decoded history: with
`fused=True` on the CPU, `SplitStates` over the compiled kernel
(attention/rvq.py); otherwise `CodedStates` (attention/coded.py, PyTorch); longer
calls (prefill, perplexity chunks) decode and attend as every CompressedCache
does. `code_domain=False` keeps decode-then-attend everywhere (the reference
the bench and the tests compare against). The model must use the "kvshrink"
attention (`attention.paged.use_kvshrink_attention`); the rvq methods switch it.
"""

from __future__ import annotations

from .attention.coded import CodedStates
from .cache import CompressedCache, CompressedLayer
from .errors import KvshrinkError

CODE_DOMAIN_QUERIES = 8


class CodedLayer(CompressedLayer):
    code_domain = True

    def _kernel_supports(self, head_dim: int) -> bool:
        from .attention.rvq import supported

        return supported(self.k.codec, self.v.codec, head_dim)

    body_reads_stage = True  # per-token codes: the stage is read in place after the body

    def _body(self):
        from .attention.rvq import RVQBody

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
        self.k.append(key_states, defer=True)  # decode steps: tokens wait in float16 (store.py)
        self.v.append(value_states, defer=True)
        return states, states


class CodedCache(CompressedCache):
    """CompressedCache with code-domain decode attention (see the module doc)."""

    layer_cls = CodedLayer

    def __init__(self, *args, code_domain: bool = True, fused: bool = False, **kwargs):
        """fused: decode steps on the CPU use the compiled kernel (attention/rvq.py) where it reads
        the codes; code_domain: otherwise attend from the codes with PyTorch (attention/coded.py);
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
            return ("fused decode attention (compiled kernel on the CPU where it reads the codes, "
                    "PyTorch from the codes otherwise)")
        return "attention from the codes (PyTorch)" if self.attend == "codes" else "decode-then-attend"
