"""Where does attention concentrate? Per layer, the share of the observed attention that the importance-aware
cache's high class holds (`MixedCache.high_mass`), for tokens picked by attention and at random, beside the share
of tokens it holds: FDC's question of which layers have more important tokens, on the bundled model.

Two WikiText-2 test segments of 2,048 tokens go through `mix-int2` in chunks of 64 (the bench's protocol); each
layer's high class then holds 10% of each head's tokens. Prints a table and writes docs/img/mixed_layers.png.

    .venv/bin/python scripts/mixed_layers.py    (about 1 minute)
"""

import matplotlib
import torch

import kvshrink
from kvshrink.corpus import load_corpus_ids, segments

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SEGMENTS, LENGTH, CHUNK = 2, 2048, 64


@torch.no_grad()
def run(model, method: str, segs) -> list[float]:
    mass = []
    for seg in segs:
        seg = seg.view(1, -1)
        cache = kvshrink.from_method(method, model)
        for i in range(0, seg.shape[1], CHUNK):
            model(seg[:, i:i + CHUNK], past_key_values=cache, use_cache=True)
        mass.append(cache.high_mass())
    return [sum(m[i] for m in mass) / len(mass) for i in range(len(mass[0]))]


def main():
    model, tok = kvshrink.load_model()
    model = kvshrink.prepare(model, "mix-int2")
    segs = segments(load_corpus_ids(tok), LENGTH, SEGMENTS)
    picked, drawn = run(model, "mix-int2", segs), run(model, "mix-int2:select=random", segs)
    print("| layer | attention's share held (picked by attention) | (drawn at random) |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(zip(picked, drawn)):
        print(f"| {i} | {a:.3f} | {b:.3f} |")
    print(f"| mean | {sum(picked) / len(picked):.3f} | {sum(drawn) / len(drawn):.3f} |")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(picked, "o-", label="10% of tokens, picked by attention")
    ax.plot(drawn, "s--", label="10% of tokens, drawn at random")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of observed attention held high")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("mix-int2, SmolLM2-135M, WikiText-2 test, 2 x 2048 tokens")
    fig.tight_layout()
    fig.savefig("docs/img/mixed_layers.png", dpi=110)


if __name__ == "__main__":
    main()
