"""Which side of ZDC costs more on this model: keys or values?

Uniform ranks for keys and values set separately (sink tokens full rank, no
window), perplexity change on WikiText-2 test segments against DynamicCache:

    .venv/bin/python scripts/zdc_kv_split.py --segments 1 --seg-len 1024
"""

import argparse

import torch

from kvshrink import load_model
from kvshrink.codecs.base import Fp16
from kvshrink.corpus import load_corpus_ids, segments
from kvshrink.eval.perplexity import evaluate_quality
from kvshrink.families.lowrank import transform as zdc
from kvshrink.families.lowrank.cache import ZdcCache
from kvshrink.spec import spec_from_config


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--segments", type=int, default=1)
    p.add_argument("--seg-len", type=int, default=1024)
    p.add_argument("--pairs", default="32:64,64:32,16:64,64:48", help="key_rank:value_rank,...")
    args = p.parse_args()
    model, tok = load_model()
    zmodel = zdc.apply(model, zdc.load_or_calibrate(model, tok))
    L, H, D = zmodel.kvshrink_zdc.shape

    def maker(rk, rv):
        ranks = zdc.ZdcRanks(torch.full((L, H), rk), torch.full((L, H), rv), D)
        return lambda: ZdcCache(zmodel, ranks, Fp16(), sink=4)

    pairs = [tuple(int(x) for x in pair.split(":")) for pair in args.pairs.split(",")]
    makers = {f"k{rk}v{rv}": maker(rk, rv) for rk, rv in pairs}
    ids = load_corpus_ids(tok, None, args.segments * args.seg_len + 64)
    segs = segments(ids, args.seg_len, args.segments)
    res = evaluate_quality(model, spec_from_config(model.config), makers, segs, 64,
                           models={n: zmodel for n in makers})
    for name, r in res.items():
        print(f"{name:14s} ppl {r['ppl']:.3f}  change {100 * r['ppl_change']:+.2f}%  KL {r.get('kl', 0):.4f}")


if __name__ == "__main__":
    main()
