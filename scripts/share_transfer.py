"""Does a share calibration's per-layer gain carry over to other text (`mix-auto-6x:shares=allocated`, issue 23)?

The share calibration (families/mixed/autoshares.py) measures each layer alone: its KL per token when that layer's
picks (each head's tokens most attended by the 32 queries after them, over the whole sequence: static picks) keep
8-bit codes and the rest the body's. Here every layer holds its picks at once, on 2,048 tokens read as one sequence
(each query reading its 16 positions before it unchanged, as the calibration): at share 0, at the uniform share, and
at the allocated shares; on the calibration's own tokens (no --at) and on the corpus's tokens from --at on. The
method's share calibration must exist (a bench run of the method measures it).

    .venv/bin/python scripts/share_transfer.py [--method mix-auto-6x] [--at 10000]
"""

import argparse
import time

import torch

from kvshrink import get_method, load_model, prepare
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, collect
from kvshrink.families.budget.allocate import calibration_shape
from kvshrink.families.budget.cache import layer_codecs
from kvshrink.families.budget.config import RECENT
from kvshrink.families.mixed import autoshares, budgeted
from kvshrink.families.mixed.allocate import ShareCalibration, choose, picks, scores
from kvshrink.spec import spec_from_config

CORPUS = "../shared/data/wikitext-2-raw/wiki.test.raw"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="mix-auto-6x")
    ap.add_argument("--at", type=int, default=None, help="first corpus token of the sequence (default: the "
                                                         "calibration's own tokens)")
    ap.add_argument("--corpus", default=CORPUS)
    args = ap.parse_args()
    model, tok = load_model()
    prepare(model, args.method, tok, args.corpus)
    config, spec = get_method(args.method).config, spec_from_config(model.config)
    chosen, high = budgeted.chosen_for(config, model, args.method), budgeted.high_codec(config)
    path = autoshares.found(model, autoshares.digest(chosen, config.high, config.block, config.sink))
    if path is None:
        raise SystemExit(f"no share calibration for {args.method}: run kvshrink bench --methods "
                         f"{args.method}:shares=allocated first")
    calib = ShareCalibration.load(path)
    if args.at is None:
        seq = calibration_ids(tok, args.corpus, *calibration_shape(spec))[0].reshape(1, -1)
    else:
        with open(args.corpus) as f:
            seq = tok(f.read(), return_tensors="pt").input_ids[:, args.at:args.at + 2048]
    allocated = choose(calib, config.share, autoshares.extra(chosen.allocation, high, spec))
    pairs = layer_codecs(chosen.allocation, config.block, spec.rope, chosen.found, chosen.tables, chosen.vectors)
    trips = autoshares.trips(pairs, high, config.sink, config.block)
    scaling = {m.layer_idx: m.scaling for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "scaling")}
    collected = next(collect(model, seq))
    score = [scores(collected[i][0], collected[i][1], scaling.get(i, spec.head_dim ** -0.5))
             for i in range(spec.num_layers)]
    grid = calib.header["shares"]
    with torch.no_grad():
        perturbed = Perturbed(model, seq, recent=RECENT)
        for label, shares in (("share 0", [0.0] * spec.num_layers),
                              (f"uniform {config.share:.0%}", [config.share] * spec.num_layers),
                              ("allocated", allocated)):
            t0 = time.time()
            kl = perturbed.kl_many({i: trips(i, picks(score[i], s, config.sink)) for i, s in enumerate(shares)})
            summed = sum(float(calib.proxy[i, grid.index(s)]) for i, s in enumerate(shares))
            print(f"{label:>12}: KL {kl:.5f} with every layer at once; the calibration's per-layer sum {summed:.5f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
