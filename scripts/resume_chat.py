"""Resume a chat from a saved compressed cache against recomputing its prompt (KVComp, int, auto, ZDC and RVQ files).

    python scripts/resume_chat.py [--tokens 4096] [--method kvcomp-eb0.1] [--out /tmp/resume]

For a WikiText-2 prompt of --tokens tokens it reports:
  - the compressed cache file (cache.save) against the same prompt's DynamicCache saved with
    torch.save (float32, as the model computed it) and its float16 size;
  - time to resume: load the file and generate the first new token, against recomputing the
    prompt (prefill through a fresh cache) and generating that token, and against torch.load
    of the uncompressed cache;
  - that the resumed cache continues exactly as the original compressed cache (16 greedy tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import DynamicCache

from kvshrink import from_method, get_method, load_cache, load_model, prepare
from kvshrink.corpus import load_corpus_ids


def _greedy(model, cache, x, n):
    out = []
    for _ in range(n):
        tok = model(x, past_key_values=cache, use_cache=True).logits[0, -1].argmax()
        out.append(int(tok))
        x = tok.view(1, 1)
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--method", default="kvcomp-eb0.1")
    ap.add_argument("--out", default="/tmp/kvshrink-resume")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model, tok = load_model()
    method = get_method(a.method)
    base, model = model, prepare(model, method, tok)  # ZDC: a transformed copy, which only its cache reads
    ids = load_corpus_ids(tok, None, a.tokens + 1)[None]
    prompt, nxt = ids[:, :a.tokens], ids[:, a.tokens:a.tokens + 1]
    res = {"tokens": a.tokens, "method": a.method}

    def prefill_then_step():
        cache = from_method(method, model)
        model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        model(nxt, past_key_values=cache, use_cache=True)
        return cache

    t0 = time.perf_counter()
    cache = from_method(method, model)
    model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    res["prefill_s_first"] = time.perf_counter() - t0
    path = os.path.join(a.out, "chat.kvc")
    res["file_bytes"] = cache.save(path)
    res["held_bytes"] = cache.nbytes()
    dyn = DynamicCache()
    base(prompt, past_key_values=dyn, use_cache=True, logits_to_keep=1)
    dpath = os.path.join(a.out, "chat-dynamic.pt")
    torch.save([(layer.keys, layer.values) for layer in dyn.layers], dpath)
    res["torch_save_fp32_bytes"] = os.path.getsize(dpath)
    res["fp16_bytes"] = cache.fp16_nbytes()

    times = {"recompute": [], "load_compressed": [], "torch_load_fp32": []}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        prefill_then_step()
        times["recompute"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loaded = load_cache(path, model)
        model(nxt, past_key_values=loaded, use_cache=True)
        times["load_compressed"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dc = DynamicCache()
        for i, (k, v) in enumerate(torch.load(dpath)):
            dc.update(k, v, i)
        base(nxt, past_key_values=dc, use_cache=True)
        times["torch_load_fp32"].append(time.perf_counter() - t0)
    res["resume_s"] = {k: min(v) for k, v in times.items()}
    loaded = load_cache(path, model)
    res["same_continuation"] = _greedy(model, cache, nxt, 16) == _greedy(model, loaded, nxt, 16)
    print(json.dumps(res, indent=1))
    with open(os.path.join(a.out, "resume.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
