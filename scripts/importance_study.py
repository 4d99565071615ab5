"""Important tokens kept exactly (issue 23's lever), measured for issue 19's targets before any store is built.

Every layer's keys and values go through the round trip of the allocation `auto:budget=B` picks (joint-basis keys,
a 16-token window in 8-bit codes, as `auto-6x`), except a share p of each (layer, KV head)'s tokens, the ones its
queries attend to most, which keep their float16 keys and values. Their bytes (float16 keys and values and a 16-bit
position per head) come out of the budget: B is raised until the whole cache holds what `auto-6x` holds at 2,048
tokens, so each row has the same bytes as the first.

Importance: the attention a token receives, summed over its KV head's query heads and over every query of the
sequence (the unchanged model's; `--causal`: only the queries of the token's own 64-token chunk and the next
chunk, what a cache has seen when it codes a block). `--rule` picks the tokens from the keys alone instead, what a
cache could do when it codes a block without any query's scores: `error` the key's coding error under the
queries' second moment M (the squared logit error a query meets on average), `expected` that error times the
attention the key can expect from queries ~ N(mu, M - mu mu^T) (log: s mu.k + s^2 k^T Sigma k / 2), `norm` the key's
norm. mu and M are the group's queries over the sequence, per layer and KV head. What a store could build instead:
`--seen block` counts the queries that arrive before the token's 128-token block is coded (to its end and 16 more,
the window), `--seen window` those before it leaves the 16-token window (which holds it in 8-bit codes); `--copy
stage` keeps the key as the stage's per-token codes give it back (two bits over the block's, rotated), not exact.
Scored as the other studies, but at every position: the KL
per token of the model's predictions (core/sensitivity.Perturbed) on the first 2 x 2,048 WikiText-2 test tokens,
each query reading the 32 positions before it unchanged (a protocol chunk of 64 sees 32 of its own on average).

    .venv/bin/python scripts/importance_study.py [--shares 0,0.005,0.01,0.02] [--causal] [--which both|key|value]
        [--rule attention|error|expected|norm] [--seen chunks|block|window] [--copy exact|stage]
"""

import argparse

import torch
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvshrink.attention.logits import eager_attention
from kvshrink.core.layer import stage_codec
from kvshrink.core.sensitivity import Perturbed, body_round_trip
from kvshrink.corpus import load_corpus_ids
from kvshrink.families.budget import allocate
from kvshrink.families.budget.cache import _key_codec, calibration_for, joint_for
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK, CONTEXT, WINDOW, CHUNK = 4, 128, 2048, 16, 64


def importance(model, ids: torch.Tensor, causal: bool, seen: str = "chunks") -> tuple:
    """{layer: (B, H, n)} attention received per KV head, summed over its query heads and the queries counted, and
    {layer: (mu (H, d), M (H, d, d), scaling)} of each KV head's group of queries."""
    got: dict = {}
    stats: dict = {}

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, probs = eager_attention(module, query, key, value, attention_mask, scaling, None)
        b, hq, t, n = probs.shape
        h = key.shape[1]
        if causal and seen == "chunks":  # a token's own chunk's queries and the next chunk's
            q_chunk = torch.arange(t)[:, None] // CHUNK
            k_chunk = torch.arange(n)[None] // CHUNK
            probs = probs * ((q_chunk - k_chunk) <= 1)
        elif causal:  # the queries that arrive before the token's block is coded (block: to the block's end and the
            # window after it) or before it leaves the window (window)
            ends = torch.arange(n) + WINDOW
            if seen == "block":
                ends = SINK + ((torch.arange(n) - SINK).clamp_min(0) // BLOCK + 1) * BLOCK + WINDOW
            probs = probs * (torch.arange(t)[:, None] < ends[None])
        got[module.layer_idx] = probs.sum(2).reshape(b, h, hq // h, n).sum(2)
        q = query.reshape(b, h, hq // h * t, -1).transpose(0, 1).reshape(h, b * hq // h * t, -1)
        stats[module.layer_idx] = (q.mean(1), q.transpose(1, 2) @ q / q.shape[1], module.scaling)
        return out, None

    AttentionInterface.register("kvshrink_importance", attend)
    AttentionMaskInterface.register("kvshrink_importance", sdpa_mask)
    prev = model.config._attn_implementation
    try:
        model.set_attn_implementation("kvshrink_importance")
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        model.set_attn_implementation(prev)
    return got, stats


def key_rule(rule: str, stats: tuple):
    """(keys x, their round trip y) (B, H, n, d) -> (B, H, n) scores of a rule that sees no query (module doc)."""
    mu, m, s = stats
    sigma = m - mu[:, :, None] * mu[:, None, :]

    def score(x, y):
        if rule == "norm":
            return x.norm(dim=-1)
        e = x - y
        err = torch.einsum("bhnd,hde,bhne->bhn", e, m, e)
        if rule == "error":
            return err
        expect = s * torch.einsum("bhnd,hd->bhn", x, mu) + s * s / 2 * torch.einsum("bhnd,hde,bhne->bhn", x, sigma, x)
        return expect + err.clamp_min(1e-30).log()
    return score


def key_trip(choice, layer: int, found, rope: tuple, stage: bool = False):
    """The round trip of a layer's keys under the allocation's choice, through the codec the cache builds for it
    (stage: through its stage codec, per token, what a store still holds of a key when it codes the block)."""
    codec = _key_codec(choice, layer, BLOCK, rope, found)
    return body_round_trip(stage_codec(codec) if stage else codec, SINK, BLOCK)


def top_tokens(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, k) positions of the k largest scores (B, H, n) after the sink, which is exact already."""
    s = score.clone()
    s[..., :SINK] = -torch.inf
    return s.topk(k, -1).indices


def with_exact(trip, top, k: int = 0, copy=None):
    """trip, with the positions top (B, H, k) given back as they were (copy: as its round trip gives them); or,
    top a key rule's score, the k positions it scores highest."""
    if top is None:
        return trip

    def kept(x):
        y = trip(x)
        chosen = top_tokens(top(x, y), k) if callable(top) else top
        idx = chosen[..., None].expand(-1, -1, -1, x.shape[-1])
        return y.scatter(2, idx, (x if copy is None else copy(x)).gather(2, idx))
    return kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shares", default="0,0.005,0.01,0.02,0.04")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--ratio", type=float, default=6.0)
    ap.add_argument("--which", default="both", choices=("both", "key", "value"))
    ap.add_argument("--rule", default="attention", choices=("attention", "error", "expected", "norm"))
    ap.add_argument("--seen", default="chunks", choices=("chunks", "block", "window"))
    ap.add_argument("--copy", default="exact", choices=("exact", "stage"))
    args = ap.parse_args()
    if args.rule != "attention" and args.which != "key":
        ap.error("a key rule (--rule error|expected|norm) picks keys: use it with --which key")
    model, tok = load_model()
    spec = spec_from_config(model.config)
    calib, path = calibration_for(model, BLOCK, tok)
    found = joint_for(model, BLOCK, path, tok)
    recent = allocate.window_codec(8)
    ids = load_corpus_ids(tok, None, 2 * CONTEXT).reshape(2, CONTEXT)
    score, stats = importance(model, ids, args.causal, args.seen)
    perturbed = Perturbed(model, ids, replay=False, most=CONTEXT, recent=32)
    coded = CONTEXT - SINK - WINDOW
    kept = ("key", "value") if args.which == "both" else (args.which,)
    # float16 keys and/or values and a 16-bit position, per head, against a float16 token's keys and values
    per_token = (2 * len(kept) * spec.head_dim + 2) / (4 * spec.head_dim)
    chooser = args.rule if args.rule != "attention" else "causal" if args.causal else "all queries"
    print(f"| exact share ({args.which}; {chooser}) | budget B | KL per token |")
    print("|---|---|---|")
    for p in (float(s) for s in args.shares.split(",")):
        budget = 1 / (1 / args.ratio - p * per_token * coded / CONTEXT)
        chosen = allocate.choose(calib, spec, budget, CONTEXT, SINK, BLOCK, found[0], WINDOW, recent)
        k = round(p * coded)
        changes = {}
        for i, (kc, vc) in enumerate(zip(chosen.keys, chosen.values)):
            ktrip = key_trip(kc, i, found, spec.rope)
            vtrip = body_round_trip(allocate.value_codec(vc), SINK, BLOCK)
            top = None
            if k:  # positions picked by attention, or a key rule that picks them from each round trip
                top = top_tokens(score[i], k) if args.rule == "attention" else key_rule(args.rule, stats[i])
            copy = key_trip(kc, i, found, spec.rope, stage=True) if args.copy == "stage" else None
            changes[i] = {"key": with_exact(ktrip, top if "key" in kept else None, k, copy),
                          "value": with_exact(vtrip, top if "value" in kept else None, k)}
        kl = perturbed.kl_many(changes)
        print(f"| {p:.4f} | {budget:.2f} ({chosen.ratio:.2f} expected) | {kl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
