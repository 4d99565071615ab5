"""Where does a method's loss sit: which layers, keys or values, which KV heads? And does a correction of the
softmax's bias on coded keys lower it? (issue 19)

On one 2,048-token WikiText-2 test segment: a reference pass fills a DynamicCache with every layer's keys and
values; a cache of the method is filled by a prefill of the same tokens and decoded, which gives each token's coding
error. The model then runs again with an attention that adds those errors to its own keys and values where a cache's
query reads codes: positions past the 4-token sink and more than 16 before the query (every other position exact), in
the layers, heads and kinds chosen. Reported: KL per token of the next-token distribution against the reference, and
the perplexity change. This is harsher than the bench's protocol, whose queries also read their own chunk (up to 63
tokens) exact, so its figures rank causes and are not the protocol's.

--bias: the coded keys' logits get -0.5 q^T S q, S the second moment of the key errors over the query's 128-token
block: the Jensen term by which noisy logits inflate the coded tokens' share of the softmax (with the errors
themselves, so an upper bound of what a codec-side estimate could correct).

--exact 18:2: the whole cache with those KV heads' keys and values exact, what a per-head allocation could buy at most.

    .venv/bin/python scripts/attribution_study.py --method auto-8x [--segment 0] [--layers] [--heads 18k,7v] [--bias]
        [--exact 18:2,7:2]
"""

import argparse
import json

import torch
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

import kvshrink
from kvshrink.attention.logits import plain_attention
from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model

SINK, RECENT, SEG, BLOCK = 4, 16, 2048, 128
RUN: dict = {}  # what the "study" attention changes now: layers, heads, kinds, bias
ERR: dict = {}  # layer -> (key errors, value errors) of the method's codes


def study(module, query, key, value, attention_mask, scaling=None, **kw):
    i = module.layer_idx
    if i not in RUN["layers"]:
        return plain_attention(module, query, key, value, attention_mask, scaling=scaling, **kw)
    ek, ev = ERR[i]
    on = torch.zeros(key.shape[1], 1, 1)
    on[RUN["heads"] if RUN["heads"] is not None else slice(None)] = 1
    for layer, head in RUN.get("exact", ()):
        if layer == i:
            on[head] = 0
    ek, ev = ek * on * ("k" in RUN["kinds"]), ev * on * ("v" in RUN["kinds"])
    g, t = query.shape[1] // key.shape[1], key.shape[2]
    q = query[0]
    k, v = key.repeat_interleave(g, 1)[0], value.repeat_interleave(g, 1)[0]
    kh, vh = (key + ek).repeat_interleave(g, 1)[0], (value + ev).repeat_interleave(g, 1)[0]
    pos = torch.arange(t)
    causal = pos[None] <= pos[:, None]
    coded = causal & (pos[None] >= SINK) & (pos[None] < pos[:, None] - RECENT)
    logits, noisy = q @ k.transpose(-1, -2) * scaling, q @ kh.transpose(-1, -2) * scaling
    if RUN["bias"]:
        e = ek.repeat_interleave(g, 1)[0]
        for b in range(SINK, t, BLOCK):
            eb = e[:, b:b + BLOCK]
            s = eb.transpose(-1, -2) @ eb / eb.shape[1]
            noisy[:, :, b:b + BLOCK] -= (0.5 * scaling ** 2 * ((q @ s) * q).sum(-1))[..., None]
    p = torch.softmax(torch.where(coded, noisy, logits).masked_fill(~causal, float("-inf")), -1)
    return ((p * coded) @ vh + (p * ~coded) @ v).transpose(0, 1)[None], None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="auto-8x")
    ap.add_argument("--segment", type=int, default=0)
    ap.add_argument("--layers", action="store_true", help="each layer's keys, then values, alone")
    ap.add_argument("--heads", default="", help="each KV head alone of these: layer and kind, e.g. 18k,7v")
    ap.add_argument("--bias", action="store_true", help="also the whole cache with the bias correction")
    ap.add_argument("--exact", default="", help="also the whole cache with these KV heads exact: layer:head, e.g. 18:2")
    a = ap.parse_args()
    AttentionInterface.register("study", study)
    AttentionMaskInterface.register("study", sdpa_mask)
    model, tok = load_model()
    ids = load_corpus_ids(tok, None, (a.segment + 1) * SEG)[None, a.segment * SEG:(a.segment + 1) * SEG]
    with torch.no_grad():
        exact = DynamicCache(config=model.config)
        ref = torch.log_softmax(model(ids, past_key_values=exact).logits[0, :-1].float(), -1)
        prepared = kvshrink.prepare(model, a.method, tok)
        cache = kvshrink.from_method(a.method, prepared)
        prepared(ids, past_key_values=cache, use_cache=True)
        for i, layer in enumerate(cache.layers):  # a layer in KV-head groups (heads=N): its parts side by side
            ERR[i] = tuple(torch.cat([getattr(p, s).decoded(torch.float32) for p in layer.layer_parts()], 1) - x
                           for s, x in (("k", exact.layers[i].keys), ("v", exact.layers[i].values)))
        model.set_attn_implementation("study")
        target = ids[0, 1:]
        base = -ref.gather(1, target[:, None]).mean()
        n, heads = len(cache.layers), model.config.num_key_value_heads
        runs = [dict(layers=range(n), heads=None, kinds="kv", bias=False)]
        runs += [dict(layers=range(n), heads=None, kinds="kv", bias=True)] if a.bias else []
        cells = [tuple(int(v) for v in x.split(":")) for x in a.exact.split(",") if x]
        runs += [dict(layers=range(n), heads=None, kinds="kv", bias=False, exact=cells)] if cells else []
        runs += [dict(layers=[i], heads=None, kinds=c, bias=False) for i in range(n) for c in "kv"] if a.layers else []
        runs += [dict(layers=[int(x[:-1])], heads=[h], kinds=x[-1], bias=False)
                 for x in a.heads.split(",") if x for h in range(heads)]
        for r in runs:
            RUN.clear()
            RUN.update(r)
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            kl = float((ref.exp() * (ref - logp)).sum(-1).mean())
            change = float((-logp.gather(1, target[:, None]).mean() - base).exp() - 1)
            layers = "all" if len(r["layers"]) == n else r["layers"][0]
            print(json.dumps({"method": a.method, "segment": a.segment, "layer": layers, "kind": r["kinds"],
                              "head": r["heads"][0] if r["heads"] else "all", "bias": r["bias"],
                              **({"exact": r["exact"]} if r.get("exact") else {}),
                              "kl": round(kl, 5), "ppl_change_pct": round(100 * change, 2)}), flush=True)


if __name__ == "__main__":
    main()
