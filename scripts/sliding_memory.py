"""Bytes held per kind of layer as the context grows, on a model with sliding-window layers.

    python scripts/sliding_memory.py [--model gemma3-270m] [--methods int4,kvcomp-eb0.1] [--contexts 1024,2048,4096,8192]

For each context (WikiText-2 test tokens, prefilled in chunks of 512) and each method it prints the
bytes the cache holds in its full and its sliding layers, beside transformers' DynamicCache built
from the config (float32, sliding layers keeping their window) and the fp16 reference of the ratio
(`cache.bytes_by_kind()`): a sliding layer's bytes stay flat once the context passes its window.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import DynamicCache

from kvshrink import from_method, load_model, prepare
from kvshrink.compat import with_cache
from kvshrink.corpus import default_corpus, load_corpus_ids
from kvshrink.spec import spec_from_config


@torch.no_grad()
def _fill(model, cache, ids, chunk=512):
    for s in range(0, ids.shape[1], chunk):
        model(ids[:, s:s + chunk], **with_cache(model, cache), use_cache=True, logits_to_keep=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--methods", default="int4,kvcomp-eb0.1")
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    args = ap.parse_args()
    model, tok = load_model(args.model)
    spec = spec_from_config(model.config)
    ids = load_corpus_ids(tok, default_corpus())[None]
    rows = []
    for n in (int(c) for c in args.contexts.split(",")):
        x = ids[:, :n]
        dyn = DynamicCache(config=model.config)
        _fill(model, dyn, x)
        by_kind = {}
        for i, layer in enumerate(dyn.layers):
            kind = "sliding" if spec.is_sliding(i) else "full"
            by_kind[kind] = by_kind.get(kind, 0) + layer.keys.nbytes + layer.values.nbytes
        rows.append({"context": n, "method": "DynamicCache (float32)", **{k: v for k, v in by_kind.items()}})
        for name in args.methods.split(","):
            m = prepare(model, name, tok)
            cache = from_method(name, m)
            _fill(m, cache, x)
            kinds = cache.bytes_by_kind()
            rows.append({"context": n, "method": name, **{k: held for k, (held, _) in kinds.items()},
                         **{f"{k}_fp16": fp16 for k, (_, fp16) in kinds.items()}})
    print(f"{spec.model_type}: {sum(map(spec.is_sliding, range(spec.num_layers)))} of {spec.num_layers} layers "
          f"slide over {spec.sliding_window} tokens")
    print("| context | cache | full layers KiB | sliding layers KiB | sliding ×fp16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['sliding_fp16'] / r['sliding']:.2f}" if "sliding_fp16" in r else "–"
        print(f"| {r['context']} | {r['method']} | {r['full'] / 1024:.0f} | {r['sliding'] / 1024:.0f} | {ratio} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
