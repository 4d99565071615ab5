"""Would non-uniform levels beat uniform integer codes at the same bytes? Measured KL per token
(core/sensitivity.Perturbed, 512 calibration tokens) when one layer's keys or values go through:
- int: uniform min/max codes (IntQuant), Hadamard-rotated (r) or not, key groups of 128 or 64 tokens;
- lm: the Gaussian Lloyd-Max levels scaled by each group's float16 mean and standard deviation
  (IntQuant(levels="gauss"), codecs/levels.py; TurboQuant's idea: after a rotation coordinates are
  near Gaussian), the same bytes per group.

    .venv/bin/python scripts/levels_study.py
"""

from kvshrink.codecs.quant import IntQuant
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import Perturbed, body_round_trip
from kvshrink.models import load_model

SINK, BLOCK = 4, 128
LAYERS = (0, 1, 3, 10, 16, 17, 20, 25)


def trip(kind: str, bits: int, axis: str, group, rotate: bool, seed: int):
    """The layer's whole blocks after the sink through IntQuant with uniform ("int") or Gaussian ("lm") levels."""
    codec = IntQuant(bits, axis, group, rotate=rotate, seed=seed, levels="gauss" if kind == "lm" else "uniform")
    return body_round_trip(codec, SINK, BLOCK)


def main():
    model, tok = load_model()
    ids, _ = calibration_ids(tok)
    perturbed = Perturbed(model, ids[:1])
    cases = {"v int r": ("value", "int", "token", None, True, 2), "v lm r": ("value", "lm", "token", None, True, 2),
             "k int r/128": ("key", "int", "channel", 128, True, 1), "k lm r/128": ("key", "lm", "channel", 128, True, 1),
             "k int r/64": ("key", "int", "channel", 64, True, 1), "k lm r/64": ("key", "lm", "channel", 64, True, 1),
             "k int /128": ("key", "int", "channel", 128, False, 1), "k lm /128": ("key", "lm", "channel", 128, False, 1)}
    print("| bits | layer | " + " | ".join(cases) + " |")
    print("|---" * (len(cases) + 2) + "|")
    for bits in (2, 3):
        for layer in LAYERS:
            kl = [perturbed.kl(layer, which, trip(kind, bits, axis, group, rot, seed))
                  for which, kind, axis, group, rot, seed in cases.values()]
            print(f"| {bits} | {layer} | " + " | ".join(f"{v:.4f}" for v in kl) + " |", flush=True)


if __name__ == "__main__":
    main()
