"""One layer's decode attention in isolation: DynamicCache (append + SDPA) against int4 (append +
one kernel call: body, dense part and merge), the same with Gemma 2's logit soft-cap (50), and the
kernel over the body alone, at 1k and 8k tokens (3 KV heads x 64, 9 query heads).

    .venv/bin/python scripts/attend_layer.py
"""

import time

import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvshrink import CompressedCache
from kvshrink.codecs.quant import IntQuant

STEPS = 40


class Module:
    """What SDPA reads from an attention module."""

    num_key_value_groups = 3
    is_causal = True
    training = False


def per_step_ms(step) -> float:
    """Median over 5 batches of STEPS calls (this machine's timings vary by 20% run to run)."""
    for _ in range(3):
        step()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            step()
        times.append((time.perf_counter() - t0) / STEPS * 1000)
    return sorted(times)[2]


def main():
    torch.set_num_threads(2)
    q = torch.randn(1, 9, 1, 64)
    for n in (1000, 8100):
        dyn = DynamicCache()
        dyn.update(torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64), 0)

        def dyn_step():
            k, v = dyn.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64), 0)
            return sdpa_attention_forward(Module(), q, k, v, None, scaling=0.125)

        cache = CompressedCache(num_layers=1, key_codec=IntQuant(4, "channel", 128, seed=1),
                                value_codec=IntQuant(4, "token", seed=2), sink=4, window=0, block=128, attend="fused")
        layer = cache.layers[0]
        layer.update(torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64))

        def int_step(cap=None):
            states, _ = layer.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
            return states.attend(None, q, None, None, cap)

        td, ti, tc = per_step_ms(dyn_step), per_step_ms(int_step), per_step_ms(lambda: int_step(50.0))
        states, _ = layer.update(torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64))
        vis = torch.ones(1, states.body.num_tokens, dtype=torch.bool)
        dense, dvis = torch.zeros(1, 3, 0, 64), torch.ones(1, 1, 0, dtype=torch.bool)
        tk = per_step_ms(lambda: states.body.attend(torch.randn(1, 3, 3, 64), vis, dense, dense, dvis, 4))
        print(f"{n} tokens: DynamicCache append + SDPA {td:.2f} ms/layer; int4 append + fused attention "
              f"{ti:.2f} ms/layer ({tc:.2f} soft-capped), of which the kernel over the body {tk:.2f}")


if __name__ == "__main__":
    main()
