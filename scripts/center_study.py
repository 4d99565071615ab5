"""Values centred before coding: each layer's mean value vector per KV head (from the calibration tokens) taken off
before the menu's value codes and added back after, measured on `auto-Nx`'s allocation as vq_study.py measures (KL
per token at every position of the first 2 x 2,048 WikiText-2 test tokens, each query reading the 32 positions
before it unchanged). The mean holds 3-50% of a head's value energy and centring takes 11% off the values' squared
error, yet the KL rises (docs/budget.md, "Vector levels for values").

    .venv/bin/python scripts/center_study.py 6 8
"""

import sys

import torch
from importance_study import key_trip  # this folder is on the path

from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, body_round_trip, collect
from kvshrink.corpus import load_corpus_ids
from kvshrink.families.budget import allocate
from kvshrink.families.budget.cache import calibration_for, joint_for
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK, CONTEXT, WINDOW = 4, 128, 2048, 16


def centred(codec, mu):
    def trip(x):
        n = (x.shape[2] - SINK) // BLOCK * BLOCK
        y = x.clone()
        body = (x[:, :, SINK:SINK + n].float() - mu[None, :, None]).contiguous()
        y[:, :, SINK:SINK + n] = (codec.decode(codec.encode(body, BLOCK)) + mu[None, :, None]).to(x.dtype)
        return y
    return trip


model, tok = load_model()
spec = spec_from_config(model.config)
calib, path = calibration_for(model, BLOCK, tok)
found = joint_for(model, BLOCK, path, tok)
cids, _ = calibration_ids(tok)
sums = {}
for seq in collect(model, cids, sink=SINK):
    for i, (q, k, dk, v, dv) in seq.items():
        sums[i] = sums.get(i, 0) + v.sum(1).double()
count = cids.shape[0] * (cids.shape[1] - SINK)
mus = {i: (s / count).float() for i, s in sums.items()}
torch.set_grad_enabled(False)
ids = load_corpus_ids(tok, None, 2 * CONTEXT).reshape(2, CONTEXT)
perturbed = Perturbed(model, ids, replay=False, most=CONTEXT, recent=32)
for ratio in [float(r) for r in sys.argv[1:]]:
    chosen = allocate.choose(calib, spec, ratio, CONTEXT, SINK, BLOCK, found[0], WINDOW, allocate.window_codec(8),
                             joint1=ratio >= 8)
    keys = {i: key_trip(kc, i, found, spec.rope) for i, kc in enumerate(chosen.keys)}
    for centre in (False, True):
        changes = {}
        for i, vc in enumerate(chosen.values):
            codec = allocate.value_codec(vc)
            vt = centred(codec, mus[i]) if centre else body_round_trip(codec, SINK, BLOCK)
            changes[i] = {"key": keys[i], "value": vt}
        print(ratio, "centred" if centre else "as cached", f"{perturbed.kl_many(changes):.4f}", flush=True)
