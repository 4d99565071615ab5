"""Each layer's queries, keys and values on calibration tokens, with the gradient of the language-model
loss with respect to the keys and values: what a loss proxy (families/lowrank, families/budget) is
measured from.

One forward and backward pass per calibration sequence through a collecting attention (plain
attention over leaf tensors, so autograd keeps their gradients); the model's weights get no
gradient and its attention implementation is restored afterwards.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..attention.logits import plain_attention, recent_attention

_COLLECT = "kvshrink_collect"


def _register(store: dict) -> None:
    def collect(module, query, key, value, attention_mask, **kwargs):
        k = key.detach().requires_grad_(True)  # leaves: the loss gradient stays on them
        v = value.detach().requires_grad_(True)
        store[module.layer_idx] = (query.detach(), k, v)
        return plain_attention(module, query, k, v, attention_mask, **kwargs)

    AttentionInterface.register(_COLLECT, collect)
    AttentionMaskInterface.register(_COLLECT, sdpa_mask)


def collect(model, ids: torch.Tensor, sink: int = 0, progress=None, offsets=None):
    """Yields, for each sequence of `ids` (sequences, length), {layer: (q, k, dk, v, dv)}: q (Hq, n, D),
    k, v and the loss gradients dk, dv (H, n, D), post-RoPE as the cache sees them, without the
    first `sink` tokens (kept exactly by the caches, so left out of the statistics).

    offsets: the first position of each sequence (default 0). RoPE makes attention depend on relative
    positions only, so the model computes the same values and loss at any offset, while the post-RoPE
    queries and keys turn as they would that far into a long context."""
    store: dict = {}
    _register(store)
    prev_impl = model.config._attn_implementation
    prev_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        model.set_attn_implementation(_COLLECT)
        for j, seq in enumerate(ids):
            store.clear()
            start = int(offsets[j]) if offsets is not None else 0
            pos = torch.arange(start, start + seq.numel(), device=seq.device)[None]
            out = model(seq[None], labels=seq[None], position_ids=pos, use_cache=False)
            out.loss.backward()
            yield {i: (q[0, :, sink:], k[0, :, sink:].detach(), k.grad[0, :, sink:], v[0, :, sink:].detach(),
                       v.grad[0, :, sink:]) for i, (q, k, v) in store.items()}
            if progress is not None:
                progress()
    finally:
        model.set_attn_implementation(prev_impl)
        for p, r in zip(model.parameters(), prev_grad):
            p.requires_grad_(r)
        store.clear()


_PERTURB = "kvshrink_perturb"
_TARGET: dict = {}  # layer -> {"key" | "value": round trip function}: what the perturbing attention changes
_RECENT = [0]  # a query reads the keys and values at most this many positions back as they are (Perturbed's recent)


def _register_perturb() -> None:
    def perturb(module, query, key, value, attention_mask, **kwargs):
        trips = _TARGET.get(module.layer_idx, {})
        new_key = trips["key"](key) if "key" in trips else key
        new_value = trips["value"](value) if "value" in trips else value
        if _RECENT[0] and trips:
            return recent_attention(module, query, key, value, new_key, new_value, attention_mask, _RECENT[0], **kwargs)
        return plain_attention(module, query, new_key, new_value, attention_mask, **kwargs)

    AttentionInterface.register(_PERTURB, perturb)
    AttentionMaskInterface.register(_PERTURB, sdpa_mask)


class Perturbed:
    """The model's next-token log-probabilities on calibration tokens with one layer's keys or
    values replaced by a round trip through a codec (`kl`), against the unchanged model's: a
    measured loss change where a first-order proxy is not to be trusted (large errors).

    With `replay` (the default where the model keeps its decoder layers in `model.model.layers`),
    the layers before the perturbed one are not run again: they return the outputs they gave in
    the unchanged pass, which a change further on cannot alter. That halves a calibration's
    forward work on average and gives the same numbers (tests/test_budget.py).

    A sequence longer than `most` tokens is scored at `most` positions evenly spaced over it (every one up to
    `most`): the log-probabilities of 2,048 positions over Gemma 3's 262,144-token vocabulary take 4.3 GB in
    float64 and half of each forward pass's work, and the layers still attend over every token.

    recent: each query of a changed layer reads the `recent` positions before it unchanged (recent_attention), as a
    cache's queries read their float16 and window tokens and a prompt chunk's own tokens; 0: every position changed."""

    def __init__(self, model, ids: torch.Tensor, replay: bool = True, most: int = 512, recent: int = 0):
        self.model, self.ids, self.recent = model, ids, recent
        stride = -(-ids.shape[-1] // most)
        self.keep = {} if stride == 1 else {"logits_to_keep": torch.arange(stride - 1, ids.shape[-1], stride)}
        _register_perturb()
        self.layers = getattr(getattr(model, "model", None), "layers", None) if replay else None
        self.outs: dict = {}
        hooks = [layer.register_forward_hook(lambda _m, _a, out, j=j: self.outs.__setitem__(j, out))
                 for j, layer in enumerate(self.layers or [])]
        try:
            self.ref = self._logp()
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def _logits(self) -> torch.Tensor:
        prev = self.model.config._attn_implementation
        try:
            self.model.set_attn_implementation(_PERTURB)
            return self.model(self.ids, use_cache=False, **self.keep).logits
        finally:
            self.model.set_attn_implementation(prev)

    def _logp(self) -> torch.Tensor:
        # float64: on a model that barely reacts, float32 rounding is as large as the KL itself
        return torch.log_softmax(self._logits().double(), -1)

    def kl(self, layer: int, which: str, trip) -> float:
        """Mean KL(unchanged || perturbed) per token when `trip` (B, H, n, D) -> same replaces the
        layer's keys or values (which: "key" or "value")."""
        return self.kl_many({layer: (which, trip)})

    def kl_many(self, changes: dict) -> float:
        """`kl` with several layers changed at once (what a whole cache's codes do): {layer: (which, trip)}, or
        {layer: {"key": trip, "value": trip}} to change a layer's keys and values together."""
        _TARGET.clear()
        _TARGET.update({i: c if isinstance(c, dict) else dict([c]) for i, c in changes.items()})
        _RECENT[0] = self.recent
        early = list(self.layers or [])[:min(changes)]
        for j, m in enumerate(early):  # an instance attribute shadows the class's forward until deleted
            m.forward = lambda *_a, _out=self.outs[j], **_k: _out
        try:
            logits = self._logits()
        finally:
            _TARGET.clear()
            _RECENT[0] = 0
            for m in early:
                del m.forward
        return mean_kl(self.ref, logits)


def mean_kl(ref: torch.Tensor, logits: torch.Tensor, rows: int = 32) -> float:
    """Mean over positions of KL(exp(ref) || softmax(logits)), ref float64 log-probabilities (..., V), in float64 a
    few rows at a time. Whole-size float64 temporaries (200 MB each for 512 positions of a 49k vocabulary) were
    mapped fresh by every call: that took 45% of a calibration pass's time on the bundled model (docs/budget.md)."""
    ref, logits = ref.reshape(-1, ref.shape[-1]), logits.reshape(-1, logits.shape[-1])
    total = 0.0
    for s in range(0, ref.shape[0], rows):
        r = ref[s:s + rows]
        total += float((r.exp() * (r - torch.log_softmax(logits[s:s + rows].double(), -1))).sum())
    return total / ref.shape[0]


def body_round_trip(codec, sink: int, block: int, heads: slice = slice(None)):
    """x (B, H, n, D) -> x with its whole blocks after the sink through `codec` (a cache's body), in the KV heads
    `heads` only (all by default): what `Perturbed` changes one layer's keys or values by to measure a codec's loss."""
    def trip(x):
        n = (x.shape[2] - sink) // block * block
        y = x.clone()
        body = x[:, heads, sink:sink + n].float().contiguous()
        y[:, heads, sink:sink + n] = codec.decode(codec.encode(body, block)).to(x.dtype)
        return y
    return trip
