"""How much error does a key block's stage add? (docs/quant.md, "The stage")

Per-channel keys need a whole block before they can be coded, so a block still filling waits in
per-token codes (the stage) and is re-coded per channel from them when it fills. For every layer of
the bundled model (one 2,048-token WikiText-2 segment, keys after RoPE as the cache sees them), this
prints the attention-score error (mean over queries and keys of (q . error)^2) of candidate stage
codecs, alone and after re-coding into the block codec, relative to coding the block directly.

    .venv/bin/python scripts/stage_study.py
"""

import torch

from kvshrink.codecs.quant import IntQuant
from kvshrink.core.sensitivity import collect
from kvshrink.corpus import load_corpus_ids
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

BLOCK, SINK = 128, 4


def score_error(q: torch.Tensor, e: torch.Tensor) -> float:
    """mean (q . e)^2 over every eighth query of each KV head's query group and every key."""
    h = e.shape[0]
    qs = q.reshape(h, q.shape[0] // h, -1, q.shape[-1])[:, :, ::8]
    return (torch.einsum("hgqd,hkd->hgqk", qs, e) ** 2).mean().item()


def main():
    model, tok = load_model()
    spec = spec_from_config(model.config)
    layers = next(collect(model, load_corpus_ids(tok)[:2048][None], sink=SINK))
    n = (2048 - SINK) // BLOCK * BLOCK
    stages = {f"int{b}{'-rot' if r else ''}": IntQuant(b, "token", rotate=r, seed=3)
              for b in (4, 5, 6, 7, 8) for r in (False, True)}
    bodies = {"int4": IntQuant(4, "channel", BLOCK),
              "int3-rot turned": IntQuant(3, "channel", BLOCK, rotate=True, seed=1, derope=spec.rope),
              "int2-rot turned": IntQuant(2, "channel", BLOCK, rotate=True, seed=1, derope=spec.rope)}
    sizes = {s: c.nbytes(c.encode(torch.zeros(1, 1, 1, spec.head_dim), 1)) for s, c in stages.items()}
    print("body | stage | bytes per token and head | alone | re-coded into the body (mean, max over layers)")
    for bn, bc in bodies.items():
        rows = {s: ([], []) for s in stages}
        for q, k, _, _, _ in layers.values():
            x = k[None, :, :n].float().contiguous()
            direct = score_error(q.float(), (bc.decode(bc.encode(x, BLOCK)) - x)[0])
            for s, sc in stages.items():
                staged = sc.decode(sc.encode(x, 1))
                rows[s][0].append(score_error(q.float(), (staged - x)[0]) / direct)
                rows[s][1].append(score_error(q.float(), (bc.decode(bc.encode(staged, BLOCK)) - x)[0]) / direct)
        for s, (alone, then) in rows.items():
            a, t = torch.tensor(alone), torch.tensor(then)
            print(f"{bn} | {s} | {sizes[s]} | {a.mean():.3f} | {t.mean():.3f}, {t.max():.3f}")


if __name__ == "__main__":
    main()
