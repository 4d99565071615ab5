"""Two budget calibrations of the same model and tokens side by side: each value and key choice's
summed KL over the layers and its bytes per token, then the allocator's expected summed KL at each
preset ratio. What docs/budget.md's "8-bit scales" table comes from (an older file's format is read
as it is; its menu must be the current one's):

    .venv/bin/python scripts/calib_diff.py OLD.safetensors NEW.safetensors
"""

import sys

from safetensors import safe_open

from kvshrink.core.calibfile import load_tensors
from kvshrink.families.budget import allocate as A
from kvshrink.families.budget.config import PRESETS
from kvshrink.models import load_config
from kvshrink.spec import spec_from_config


def load(path: str) -> A.BudgetCalibration:
    with safe_open(path, "pt") as f:
        fmt = f.metadata().get("format")
    tensors, header = load_tensors(path, fmt, A._TENSORS, "a budget calibration")
    return A.BudgetCalibration(**tensors, header=header)


def main(old_path: str, new_path: str) -> None:
    old, new = load(old_path), load(new_path)
    spec = spec_from_config(load_config())
    for side, menu, po, pn, bo, bn in (("value", A.VALUE_MENU, old.proxy_v, new.proxy_v, old.bytes_v, new.bytes_v),
                                       ("key", A.KEY_MENU, old.proxy_k, new.proxy_k, old.bytes_k, new.bytes_k)):
        print(f"| {side} choice | bytes / token | summed KL, old | summed KL, new |")
        print("|---|---|---|---|")
        for j, c in enumerate(menu):
            ok = po[:, j].isfinite()
            if ok.any():
                print(f"| {A.describe_choice(c)} | {float(bo[0, j]):.0f} -> {float(bn[0, j]):.0f} | "
                      f"{float(po[ok, j].sum()):.4f} | {float(pn[ok, j].sum()):.4f} |")
    for ratio in PRESETS:
        a, b = (A.choose(c, spec, ratio, 2048, 4, old.header.get("block", 128)) for c in (old, new))
        print(f"{ratio}x: expected summed KL {a.proxy:.4f} -> {b.proxy:.4f} ({100 * (b.proxy / a.proxy - 1):+.0f}%)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
