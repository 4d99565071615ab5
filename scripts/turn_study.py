"""Does coding keys as before RoPE pay, and does it need positions? The KL per token of the bundled
model's predictions (core/sensitivity.Perturbed, 2 x 2,048 WikiText-2 test tokens) when every layer's
keys after the 4 sink tokens go through per-channel integer codes over groups of 128 tokens:
- plain: the keys as the cache gets them, after RoPE (the int* methods before this study);
- pre-RoPE: turned back by their absolute positions' angles (KVQuant; the cache would need positions);
- turned: turned back by their offset in the group only (codecs/spin.py; no positions).
Hadamard-rotated (r) or not, at 2 and 3 bits.

    .venv/bin/python scripts/turn_study.py
"""

import torch

from kvshrink.codecs.quant import IntQuant
from kvshrink.codecs.spin import angles
from kvshrink.core.sensitivity import Perturbed
from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK = 4, 128


def main():
    model, tok = load_model()
    spec = spec_from_config(model.config)
    ids = load_corpus_ids(tok, None, 2 * 2048).reshape(2, 2048)
    cos, sin = angles(spec.rope, ids.shape[1], torch.device("cpu"))  # absolute positions' angles
    n_pairs = len(spec.rope)

    def absolute(x, sign):
        c, s = cos[SINK:SINK + x.shape[-2]], sin[SINK:SINK + x.shape[-2]] * sign
        a, b = x[..., :n_pairs], x[..., n_pairs:2 * n_pairs]
        return torch.cat([a * c - b * s, b * c + a * s, x[..., 2 * n_pairs:]], -1)

    def trip(bits, rotate, how):
        codec = IntQuant(bits, "channel", BLOCK, rotate=rotate, seed=1, derope=spec.rope if how == "turned" else ())

        def run(x):
            n = (x.shape[2] - SINK) // BLOCK * BLOCK
            y = x.clone()
            body = x[:, :, SINK:SINK + n].float()
            if how == "pre-RoPE":
                body = absolute(body, -1)
            body = codec.decode(codec.encode(body.contiguous(), BLOCK))
            if how == "pre-RoPE":
                body = absolute(body, 1)
            y[:, :, SINK:SINK + n] = body.to(x.dtype)
            return y
        return run

    perturbed = Perturbed(model, ids, replay=False)
    hows = ("plain", "pre-RoPE", "turned")
    print("| bits | rotation | " + " | ".join(hows) + " |")
    print("|---" * (len(hows) + 2) + "|")
    for bits in (2, 3):
        for rotate in (False, True):
            kl = [perturbed.kl_many({i: ("key", trip(bits, rotate, how)) for i in range(spec.num_layers)})
                  for how in hows]
            print(f"| {bits} | {'r' if rotate else '-'} | " + " | ".join(f"{v:.4f}" for v in kl) + " |", flush=True)


if __name__ == "__main__":
    main()
