"""A family's kernel (the integer one, or KVComp's: --kernel) of another revision against the working tree's, alternated in one process (this machine's
speed drifts by 20-40% between runs, so separate runs cannot tell a 5% change).

The other revision is imported under another package name and only its compiled `_fused` is swapped in, so both
read the same filled caches through the same Python. Kernel alone over the 30 layers (random queries), or whole
decode steps with DynamicCache timed in the same rounds (--steps).

    git worktree add /tmp/old HEAD~1 && mkdir -p /tmp/oldpkg && cp -r /tmp/old/src/kvshrink /tmp/oldpkg/kvshrink_old
    .venv/bin/python scripts/kernel_ab.py --old /tmp/oldpkg --methods int4,auto-6x [--steps] [--rounds 16]
    .venv/bin/python scripts/kernel_ab.py --old /tmp/oldpkg --kernel kvcomp --methods kvcomp-eb0.1
"""

import argparse
import importlib
import sys
import time

import torch
from transformers import DynamicCache

from kvshrink import from_method, get_method, load_model, prepare
from kvshrink.corpus import load_corpus_ids
from kvshrink.eval.needle import fill, prefill_states

CONTEXT = 8150


def kernel_calls(cache) -> list:
    """One call of each layer's kernel over what it holds, as a decode step's attention makes it."""
    calls = []
    g = torch.Generator().manual_seed(0)
    for layer in cache.layers:
        states, _ = layer.update(torch.randn(1, 3, 1, 64, generator=g), torch.randn(1, 3, 1, 64, generator=g))
        body, q = states.body, torch.randn(1, 3, 3, 64, generator=g) * 0.125
        vis = torch.ones(1, body.num_tokens, dtype=torch.bool)
        dense, dvis = torch.randn(1, 3, 21, 64, generator=g), torch.ones(1, 3, 21, dtype=torch.bool)
        calls.append(lambda b=body, q=q, v=vis, k=dense, dv=dvis, s=states.splits: b.attend(q, v, k, k, dv, s, 0.0))
    return calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True, help="a folder holding the other revision's package as kvshrink_old")
    ap.add_argument("--methods", default="int4,auto-6x")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", action="store_true", help="whole decode steps instead of the kernel alone")
    ap.add_argument("--kernel", default="quant", choices=["quant", "kvcomp"], help="the family whose kernel is swapped")
    args = ap.parse_args()
    sys.path.insert(0, args.old)
    new = importlib.import_module(f"kvshrink.families.{args.kernel}.kernel")
    fused = {"old": importlib.import_module(f"kvshrink_old.families.{args.kernel}.kernel")._fused, "new": new._fused}
    methods = args.methods.split(",")
    model, tok = load_model()
    ids = load_corpus_ids(tok, max_tokens=CONTEXT + 1)[None]
    states = prefill_states(model, ids[:, :CONTEXT])
    for m in methods:
        model = prepare(model, get_method(m), tok)
    caches = {}
    for m in methods:
        caches[m] = from_method(m, model)
        fill(caches[m], states)
    dyn = DynamicCache(config=model.config)
    fill(dyn, states)
    x = ids[:, CONTEXT:]

    def run(what):
        t0 = time.perf_counter()
        with torch.no_grad():
            if args.steps:
                model(x, past_key_values=what)
            else:
                for f in what:
                    f()
        return time.perf_counter() - t0

    work = {m: caches[m] if args.steps else kernel_calls(caches[m]) for m in methods}
    lat: dict = {}
    for r in range(args.rounds + 1):  # the first round warms up, untimed
        for m in methods:
            for v in (("old", "new") if r % 2 else ("new", "old")):
                new._fused = fused[v]
                t = run(work[m])
                if r:
                    lat.setdefault((m, v), []).append(t)
        if args.steps:
            t = run(dyn)
            if r:
                lat.setdefault(("dyn", ""), []).append(t)
    new._fused = fused["new"]
    med = {k: 1000 * sorted(v)[len(v) // 2] for k, v in lat.items()}
    if args.steps:
        print(f"DynamicCache {med['dyn', '']:.1f} ms a step")
    for m in methods:
        ratio = sorted(a / b for a, b in zip(lat[m, "new"], lat[m, "old"]))
        vs = {v: f" ({med['dyn', ''] / med[m, v]:.3f}x DynamicCache)" if args.steps else "" for v in fused}
        print(f"{m}: old {med[m, 'old']:.1f} ms{vs['old']}, new {med[m, 'new']:.1f} ms{vs['new']}; "
              f"new/old per round, median {ratio[len(ratio) // 2]:.3f}")


if __name__ == "__main__":
    main()
