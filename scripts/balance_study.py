"""The allocation measured together (docs/budget.md, "The allocation: a gain at 6x and 8x, a loss at 4x"): does the
knapsack trade keys against values wrongly because per-layer KLs do not add up?

Each round measures, on the calibration tokens, the KL of the allocation's keys together (values exact), of its
values together, and of both; scales every key proxy by (keys together / their summed proxies) and every value proxy
likewise; allocates again. Each round's allocation is then scored on the bench's protocol.

    .venv/bin/python scripts/balance_study.py RATIO SEGMENTS ROUNDS     (e.g. 6 2 3)
"""
import copy
import sys

from kvshrink import prepare
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, body_round_trip
from kvshrink.corpus import load_corpus_ids, segments
from kvshrink.eval.perplexity import evaluate_quality
from kvshrink.families.budget import allocate as A
from kvshrink.families.budget import joint as J
from kvshrink.families.budget.cache import BudgetCache, _key_codec, calibration_for, joint_for
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

ratio = float(sys.argv[1]); nseg = int(sys.argv[2]); iters = int(sys.argv[3])
model, tok = load_model()
spec = spec_from_config(model.config)
prepare(model, f"auto-{int(ratio)}x", tok)
calib, path = calibration_for(model, 128)
jc, jpath = joint_for(model, 128, path)
ids = calibration_ids(tok)[0]
P = Perturbed(model, ids[:1])
def trips(alloc):
    ks, vs = {}, {}
    for i,(k,v) in enumerate(zip(alloc.keys, alloc.values)):
        kc = _key_codec(k, i, 128, spec.rope, (jc, jpath))
        ks[i] = ("key", body_round_trip(kc, 4, 128))
        vs[i] = ("value", body_round_trip(A.value_codec(v), 4, 128))
    return ks, vs
def proxies(c, alloc):
    pk = pv = 0.0
    for i,(k,v) in enumerate(zip(alloc.keys, alloc.values)):
        pk += float(c.proxy_k[i, A.KEY_MENU.index(k)]) if k[0]!=A.JOINT else float(jc.proxy[i, J.CHOICES.index(tuple(k[1:]))])
        pv += float(c.proxy_v[i, A.VALUE_MENU.index(v)])
    return pk, pv
allocs = []
kk = kv = 1.0
for it in range(iters):
    c = copy.copy(calib); c.proxy_k = calib.proxy_k * kk; c.proxy_v = calib.proxy_v * kv
    j2 = copy.copy(jc); j2.proxy = jc.proxy * kk
    al = A.choose(c, spec, ratio, 2048, 4, 128, j2)
    ks, vs = trips(al)
    jk, jv = P.kl_many(ks), P.kl_many(vs)
    both = P.kl_many({i: {"key": ks[i][1], "value": vs[i][1]} for i in ks})
    sk, sv = proxies(calib, al)
    print(f"iter {it} kk {kk:.3f} kv {kv:.3f}: keys sum {sk:.4f} joint {jk:.4f}; values sum {sv:.4f} joint {jv:.4f}; both {both:.4f}; {al.describe()[:200]}", flush=True)
    allocs.append(al)
    kk, kv = jk/sk, jv/sv
segs = segments(load_corpus_ids(tok, None), 2048, nseg)
makers = {f"it{j}": (lambda a=a: BudgetCache(model.config, a, path, 128, None, (jc, jpath), sink=4, window=0, attend="decode")) for j,a in enumerate(allocs)}
res = evaluate_quality(model, spec, makers, segs, 64)
for n,r in res.items(): print(n, {k: (round(v,4) if isinstance(v,float) else v) for k,v in r.items() if k in ("ppl","ppl_change","kl","ratio")}, flush=True)
