"""Sequence-parallel prefill (DeepSpeed-Ulysses, as FDC uses it) and a head-sharded compressed cache.

Prefill: rank r runs the model over its slice of the prompt's tokens, every projection and MLP on
its own. In each layer, `ShardedCache.update` sends every rank the keys and values of the KV heads
it attends for, over all tokens (one all-to-all each), and stores them in the rank's own cache of
those heads (any method that codes heads alike, or ZDC, whose bases are sliced per head). The
`ParallelStates` it returns make the attention send the queries the same way, attend causally over
the whole prompt for those heads, and send the outputs back to the tokens' ranks (two more
all-to-alls). With a ZDC method the keys and values cross as the reduced coordinates their cache
keeps (`KVCache.exchange_form`): fewer bytes on the wire, and what arrives is what is stored. The
queries and outputs cross narrowed too (FDC's exchange): rank 0 shares the sink tokens' keys and
values, so each rank scores its own queries against them; a query then sends its head's key rank
of dual-basis coordinates plus those scores, and an output its value rank plus its sink weights.
Only the prompt's last `window` tokens, which meet keys kept wide, send theirs whole.

Decode: every rank runs the model on the new token; each attends for its heads over its shard of
the cache (through the method's own states, compiled kernels included), and one all-gather per
layer joins the heads' outputs, so every rank computes the same logits.

With `exchange="kv"`, queries and outputs cross whole (the same output, more bytes). With
`exchange="full"`, keys and values cross as the model made them, and the receiving rank attends
to the prompt at full width, then stores them reduced, as one process's single call does: the
single process's output, with no saving from the reduced coordinates (int-code the wire instead).

With `wire="int8"` or `"int4"` every message of the prefill is int-coded on its way (wire.py): lossy,
and 3.8x or 7.1x fewer bytes than float32.

Prompts are prefilled in one pass (no chunks), from an empty cache. Sliding-window layers (Mistral,
Gemma 2 and 3) see their window in the prefill and in decode steps; soft-capped logits (Gemma 2) are
capped as one process caps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from ..api import from_method, prepare
from ..attention.function import use_kvshrink_attention
from ..attention.logits import plain_attention, soft_cap
from ..attention.masks import band, sliding_mask
from ..compat import with_cache
from ..core.form import Form
from ..errors import KvshrinkError
from ..models import load_model
from ..spec import spec_from_config
from .exchange import Exchange, Plan
from .wire import wire_from_name

QUERY_CHUNK = 1024  # query rows per score matrix in a narrowed prefill: bounds its memory on long prompts
ALL_VISIBLE = torch.ones(1, 1, 1, 1, dtype=torch.bool)  # a 4D mask: transformers builds none; the states mask


class ShardedCache:
    """Stands where the model expects its cache (as serve's RaggedCache does): routes each layer's
    states through the exchange to this rank's cache of its heads (None when it has none)."""

    def __init__(self, inner, exchange: Exchange, forms: list, narrow_qo: bool = False, windows=None):
        self.inner, self.exchange, self.forms = inner, exchange, forms
        self.windows = windows or [None] * len(forms)  # per layer: its sliding window, or None
        plan = exchange.plan
        self.heads = plan.heads_of(plan.rank)
        self.prefill = True
        self.narrow_qo = narrow_qo  # queries and outputs cross narrowed too (where a layer has a form)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        a, b = self.heads
        extra, reduced = {}, None
        if self.prefill:
            form = self.forms[layer_idx]
            k = self.exchange.to_heads(key_states, "k", form)
            v = self.exchange.to_heads(value_states, "v", form)
            if form is not None and form.key_map is not None:
                extra["rotated"] = True  # sent in the keys' basis
                if self.narrow_qo:
                    reduced = Reduced(form, self.windows[layer_idx], k, v,
                                      *self.exchange.share_sink(key_states, value_states, form))
        else:
            k, v = key_states[:, a:b], value_states[:, a:b]
        mask = self._mask(layer_idx, k.shape[2])  # before the update: what the layer held
        held = self.inner.update(k, v, layer_idx, **extra) if self.inner is not None else (None, None)
        states = ParallelStates(self, *held, reduced, mask)
        return states, states

    def _mask(self, layer_idx: int, t: int) -> torch.Tensor | None:
        """A sliding layer's visibility: the prompt's is banded; a decode token's hides what the layer
        still holds beyond its window (it frees whole blocks only). None for a full layer: causal, or
        everything held."""
        window = self.windows[layer_idx]
        if window is None or self.inner is None:
            return None
        return sliding_mask(self.inner.layers[layer_idx], t, window)


@dataclass
class Reduced:
    """A layer's prefill with narrowed queries and outputs: what arrived of this rank's heads (keys,
    values (1, my heads, all tokens, D) in basis coordinates) and the sink's (H, n, wide) of every head."""

    form: Form
    window: int | None  # the layer's sliding window
    keys: torch.Tensor
    values: torch.Tensor
    sink_keys: torch.Tensor
    sink_values: torch.Tensor


def reduced_attend(q: torch.Tensor, sink_scores: torch.Tensor, r: Reduced, narrow: list, group: int,
                   scale: float, softcap: float | None = None,
                   window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q (1, my query heads, T, wide) over what arrived, where the `narrow` rows (T,)
    of each of this rank's KV heads take their sink tokens' scores as sent (1, my query heads, T, n) ->
    (out (1, T, my query heads, wide) in value-basis coordinates, the sink's weights (1, T, my query
    heads, n))."""
    _, hq, t, wide = q.shape
    n = sink_scores.shape[-1]
    out = q.new_zeros(1, t, hq, wide)
    probs_sink = q.new_zeros(1, t, hq, n)
    for h in range(hq // group):
        keys, values = r.keys[0, h, :, :wide], r.values[0, h, :, :wide]
        rows = slice(h * group, (h + 1) * group)
        for t0 in range(0, t, QUERY_CHUNK):
            t1 = min(t, t0 + QUERY_CHUNK)
            scores = q[0, rows, t0:t1] @ keys.T  # (G, tc, T)
            nar = narrow[h][t0:t1]
            scores[:, nar, :n] = sink_scores[0, rows, t0:t1][:, nar]
            hidden = ~band(t0, t1, t, window)[0, 0]
            probs = torch.softmax(soft_cap(scores.mul_(scale), softcap).masked_fill_(hidden, float("-inf")), -1)
            out[0, t0:t1, rows] = (probs @ values).transpose(0, 1)
            probs_sink[0, t0:t1, rows] = probs[..., :n].transpose(0, 1)
    return out, probs_sink


class ParallelStates:
    """One layer's keys and values of this rank's heads (plain tensors or the method's states object)."""

    def __init__(self, cache: ShardedCache, keys, values, reduced: Reduced | None = None, mask=None):
        self.cache, self.keys, self.values, self.reduced, self.mask = cache, keys, values, reduced, mask

    def _attend_reduced(self, module, query, scaling, softcap):
        """The prefill with narrowed queries and outputs (FDC's): each rank maps its queries into their
        heads' dual key bases and scores them against the sink itself; the head's rank attends."""
        ex, r = self.cache.exchange, self.reduced
        plan, form = ex.plan, r.form
        g, (a, b) = plan.group, self.cache.heads
        _, hq, t, d = query.shape
        q = (query.view(1, plan.kv_heads, g, t, d) @ module.zdc_qk[:, None].to(query)).view(1, hq, t, d)
        wide = form.wide
        sink = (q[..., :wide].reshape(1, plan.kv_heads, g * t, wide) @ r.sink_keys.transpose(1, 2)[None])
        qh, sh = ex.queries_to_heads(q, sink.reshape(1, hq, t, -1), form)
        n = sh.shape[-1]
        narrow = [ex.narrow_queries(0, plan.tokens, form, form.keys[h], n) for h in range(a, b)]
        scale = scaling if scaling is not None else d ** -0.5
        out, probs = reduced_attend(qh, sh, r, narrow, g, scale, softcap, r.window)
        return ex.outputs_to_tokens(out, probs, r.sink_values, form)

    def attend(self, module, query, mask, scaling=None, softcap=None):
        cache = self.cache
        ex, (a, b) = cache.exchange, cache.heads
        g = ex.plan.group
        if self.reduced is not None:
            return self._attend_reduced(module, query, scaling, softcap), None
        # the prompt's queries see the keys up to their own; a decode token all its cache holds (None)
        q = ex.to_heads(query, "q") if cache.prefill else query[:, a * g:b * g]
        t = q.shape[2]
        if a == b:
            out = query.new_zeros(1, t, 0, query.shape[-1])
        else:
            states = hasattr(self.keys, "attend")
            mask = self.mask
            # the prompt is causal: said to the states and to the eager (soft-capped) path; SDPA takes its own
            if mask is None and cache.prefill and (states or softcap is not None):
                mask = band(0, t, t)
            if states:
                out = self.keys.attend(cache.inner.head_module(module, a, b), q, mask, scaling, softcap)[0]
            else:
                out = plain_attention(module, q, self.keys, self.values, mask, scaling, softcap)[0]
        out = ex.to_tokens(out) if cache.prefill else ex.gather_heads(out)
        return out, None


def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) for the first len(targets) rows of logits (T, vocab): the prompt's own perplexity."""
    return -torch.log_softmax(logits[:targets.numel()].double(), -1).gather(1, targets[:, None])[:, 0]


def load_source(source):
    """(model, tokenizer or None): a model name (`kvshrink.load_model`), or {"folder": path} of a
    saved transformers model without a tokenizer (the tests' tiny ones)."""
    if isinstance(source, dict):
        return AutoModelForCausalLM.from_pretrained(source["folder"], dtype=torch.float32).eval(), None
    return load_model(source)


def _check(model, prompt: int, new_tokens: int, world: int) -> None:
    spec = spec_from_config(model.config)
    if prompt < world:
        raise KvshrinkError(f"a prompt of {prompt} tokens cannot be split over {world} ranks")
    if spec.max_context and prompt + new_tokens > spec.max_context:
        raise KvshrinkError(f"a prompt of {prompt} tokens + {new_tokens} new tokens is longer than the model "
                            f"allows ({spec.max_context})")


EXCHANGES = ("reduced", "kv", "full")


def check(model, tok, method: str, prompt: int, new_tokens: int, world: int, wire: str = "model",
          exchange: str = "reduced") -> None:
    """What would stop every rank alike, said once before any process starts; a method's calibration
    is made here (once) if it is missing, so the ranks only read it."""
    wire_from_name(wire)
    if exchange not in EXCHANGES:
        raise KvshrinkError(f"unknown exchange {exchange!r}; use one of {', '.join(EXCHANGES)}")
    _check(model, prompt, new_tokens, world)
    model = prepare(model, method, tok)
    spec = spec_from_config(model.config)
    plan = Plan(0, world, prompt, spec.num_kv_heads, 1)
    cache = from_method(method, model)
    forms = [cache.exchange_form(i) for i in range(spec.num_layers)]
    form, first = forms[0], plan.tokens_of(0)[1]
    if exchange == "reduced" and form is not None:
        if first < min(form.sink, prompt):
            raise KvshrinkError(f"a prompt of {prompt} tokens over {world} ranks leaves rank 0 {first} tokens, "
                                f"fewer than the {form.sink} sink tokens it shares with the others; use --exchange kv")
        most = max(max(f.keys + f.values) for f in forms)
        if most > form.wide:
            raise KvshrinkError(f"narrowed queries need sink_rank >= every rank (sink_rank {form.wide}, ranks up to "
                                f"{most}); use --exchange kv")
    cache.shard_heads(*plan.heads_of(0))


def run_rank(rank: int, world: int, source, method: str, ids: torch.Tensor, new_tokens: int,
             keep_logits: bool = False, wire: str = "model", score: bool = False, exchange: str = "reduced") -> dict:
    """One rank's share of a sequence-parallel prefill of `ids` (1, T) and `new_tokens` greedy tokens
    decoded over the head-sharded cache; the prefill's messages cross as `wire` says (wire.py), and
    keys and values at the coordinates the cache keeps ("kv"; with "reduced", queries and outputs too),
    or in full ("full").
    Returns the tokens (the same on every rank), this rank's
    prompt logits (keep_logits; then the decode steps' too) or its last token's, the bytes it sent by
    kind, and the time split;
    with `score`, also the negative log-likelihood of each next prompt token its slice predicts."""
    model, tok = load_source(source)
    model = prepare(model, method, tok)
    use_kvshrink_attention(model)
    spec = spec_from_config(model.config)
    t_all = ids.shape[1]
    _check(model, t_all, new_tokens, world)
    plan = Plan(rank, world, t_all, spec.num_kv_heads, spec.num_heads // spec.num_kv_heads)
    ex = Exchange(plan, wire_from_name(wire))
    inner = from_method(method, model)
    forms = [inner.exchange_form(i) if exchange != "full" else None for i in range(spec.num_layers)]
    a, b = plan.heads_of(rank)
    inner.shard_heads(a, b)  # before any rank sends: a method that cannot be sharded stops every rank here
    windows = [spec.sliding_window if spec.is_sliding(i) else None for i in range(spec.num_layers)]
    cache = ShardedCache(inner if b > a else None, ex, forms, narrow_qo=exchange == "reduced", windows=windows)
    s, e = plan.tokens_of(rank)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, s:e], position_ids=torch.arange(s, e)[None], attention_mask=ALL_VISIBLE,
                    use_cache=True, logits_to_keep=0 if keep_logits or score else 1, **with_cache(model, cache))
        prefill_s, prefill_comm, sent = time.perf_counter() - t0, ex.seconds, dict(ex.sent)
        logits = out.logits[0]
        nll = next_token_nll(logits, ids[0, s + 1:e + 1]) if score else None
        token = ex.broadcast_token(int(logits[-1].argmax()), src=world - 1)  # the prompt's last token is there
        tokens, cache.prefill, steps = [token], False, []
        t0 = time.perf_counter()
        for i in range(new_tokens - 1):
            step = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[t_all + i]]),
                         attention_mask=ALL_VISIBLE, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
            steps.append(step.logits[0, -1])
            token = ex.broadcast_token(int(step.logits[0, -1].argmax()), src=0)
            tokens.append(token)
        decode_s = time.perf_counter() - t0
    return {"rank": rank, "tokens": tokens, "token_range": (s, e), "heads": (a, b),
            "logits": logits if keep_logits else logits[-1:], "nll": nll, "sent": sent,
            "step_logits": torch.stack(steps) if keep_logits and steps else None,
            "sent_decode": ex.sent.get("decode", 0), "prefill_s": prefill_s, "prefill_comm_s": prefill_comm,
            "decode_s": decode_s, "decode_comm_s": ex.seconds - prefill_comm,
            "held": inner.nbytes() if b > a else 0, "layers": spec.num_layers, "wire": wire}
