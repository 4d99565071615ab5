"""Entropy coding for the one budget (issue 19: "then entropy coding of the symbols"), measured before any coder or
kernel is written for it.

The `auto-*` presets store every symbol at its full width. Their symbols are far from uniform: a 2-bit min/max code
over a block's 128 keys puts most of them on the two inner levels. So a lossless coder would hold the same cache,
the same quality, in fewer bytes, and the budget those bytes free buys wider codes elsewhere.

1. Calibration (the budget calibration's own tokens, the last 4 x 512 of the corpus): every layer's keys and values
   go through every menu choice and every joint key choice; each width class gets a static Huffman code over tuples
   of symbols (KVComp's, codecs/huffman.py), fitted to its counts (+1, so that every tuple has a code). A class the
   code would not shrink (1-bit Gaussian values) stays at fixed width.
2. Bytes as a store would hold them: each block of each head (and class) a stream decodable alone, in whole bytes,
   with a 4-byte offset; the tables' code lengths a byte each. The saving per coded token is the fixed-width bytes
   less these.
3. Allocation: `allocate.layer_bytes` is replaced, for this process only, by the same bytes less that saving on
   every coded block, plus the tables (keys' stage, the window and the sink stay fixed-width), so `auto-Nx`
   allocates N x against the coded size.
4. Quality: the bench's quality protocol on those allocations, run in this process (`kvshrink bench`'s own code).
   The cache it measures holds the symbols at fixed width; a lossless coder would not change a single decoded value.
5. Size on the evaluated tokens: the first 2,048 tokens of the corpus prefilled in chunks of 64, each coded block's
   symbols coded under the calibration's tables (what a static coder would hold), and beside it the symbols' own
   entropy (an oracle's bound).

    .venv/bin/python scripts/entropy_study.py [--methods auto-6x,auto-8x] [--segments 8] [--corpus F] [--plain]
        [--sections quality,needle]

--plain: the shipped allocations (fixed-width sizes), measured the same way: the baseline of a run.
--corpus: evaluate on another corpus; the calibration (allocation and tables) stays WikiText-2's.
--only k (or v): only the keys' (values') blocks entropy-coded, the other side at fixed width.
"""

import argparse
import json
import os

import numpy as np
import torch

import kvshrink
from kvshrink import cli
from kvshrink.codecs import huffman
from kvshrink.codecs.joint import JointKeys
from kvshrink.codecs.packing import unpack
from kvshrink.core.calibfile import calibration_ids
from kvshrink.core.sensitivity import collect
from kvshrink.corpus import load_corpus_ids
from kvshrink.families.budget import allocate
from kvshrink.families.budget.cache import calibration_for, joint_for
from kvshrink.models import load_model
from kvshrink.spec import spec_from_config

SINK, BLOCK, CONTEXT, CHUNK = 4, 128, 2048, 64
OFFSET = 4  # bytes of a stream's start (int32)


def streams(codec, packed) -> list:
    """[(width, symbols (streams, n) uint8)] of a packed body, one entry per width class of joint keys, else one.
    A stream is what a kernel would decode alone: one block of one head (and one class)."""
    t = packed.tensors
    if isinstance(codec, JointKeys):
        out, at, g = [], 0, codec.group
        for _, n, bits in codec.classes:
            size = g * n * bits // 8
            sym = unpack(t["codes"][..., at:at + size], bits, g * n)
            out.append((bits, sym.reshape(-1, sym.shape[-1]).numpy()))
            at += size
        return out
    sym = unpack(t["codes"], codec.bits, packed.meta["last"])
    # a head's symbols in token order (values are stored a token a row), cut into blocks
    flat = sym.reshape(sym.shape[0] * sym.shape[1], -1)
    return [(codec.bits, flat.reshape(-1, BLOCK * packed.head_dim).numpy())]


def tuple_counts(width: int, sym: np.ndarray) -> tuple[int, np.ndarray]:
    k = huffman.tuple_size(1 << width)
    return k, np.bincount(huffman.tuples(sym, 1 << width, k).ravel(), minlength=(1 << width) ** k)


def stream_bytes(table: huffman.Table | None, width: int, sym: np.ndarray) -> int:
    """Bytes of the streams under `table`: whole bytes each (a block decodable alone) and its offset; at fixed
    width where `table` is None (a class whose symbols the code would not shrink)."""
    if table is None:
        return width * sym.size // 8
    tup = huffman.tuples(sym, 1 << width, table.k)
    bits = table.lengths.astype(np.int64)[tup].sum(1)
    return int(((bits + 7) // 8).sum()) + OFFSET * sym.shape[0]


def calibrate_tables(model, tok, calib, found, spec):
    """{(kind, layer, choice): [(width, tuple Huffman table)]}, and per kind (layers, choices) arrays of the bytes
    saved per coded token and of the tables' bytes, on the budget calibration's tokens."""
    ids, _ = calibration_ids(tok)
    n = (ids.shape[1] - SINK) // BLOCK * BLOCK
    keep = {i: ([], []) for i in range(spec.num_layers)}
    for layers in collect(model, ids, SINK):
        for i, (_, k, _, v, _) in layers.items():
            keep[i][0].append(k[:, :n].float())
            keep[i][1].append(v[:, :n].float())
    nk = len(allocate.KEY_MENU) + (len(found[0].proxy[0]) if found else 0)
    shape = {"k": (spec.num_layers, nk), "v": (spec.num_layers, len(allocate.VALUE_MENU))}
    save = {kind: np.zeros(s) for kind, s in shape.items()}
    tbytes = {kind: np.zeros(s) for kind, s in shape.items()}
    tables = {}
    for i in range(spec.num_layers):
        # each sequence's blocks coded on their own, as a cache codes them
        k, v = (torch.stack(x)[:, None].flatten(0, 1) for x in keep[i])
        tokens = k.shape[0] * k.shape[2]
        codecs = {"k": [], "v": []}
        for c in allocate.KEY_MENU:
            ok = allocate.fits(c, BLOCK) and (spec.rope or not c[4])
            codecs["k"].append(allocate.key_codec(c, BLOCK, spec.rope) if ok else None)
        if found:
            codecs["k"] += [found[0].codec(i, j, BLOCK, spec.rope) for j in range(len(found[0].proxy[0]))]
        codecs["v"] = [allocate.value_codec(c) if allocate.fits(c, spec.head_dim) else None
                       for c in allocate.VALUE_MENU]
        for kind, x in (("k", k), ("v", v)):
            for j, codec in enumerate(codecs[kind]):
                if codec is None:
                    continue
                made, fixed, coded = [], 0, 0
                for w, sym in streams(codec, codec.encode(x, BLOCK)):
                    _, cnt = tuple_counts(w, sym)
                    table = huffman.Table.from_counts(cnt + 1, n_symbols=1 << w)
                    if stream_bytes(table, w, sym) >= stream_bytes(None, w, sym):
                        table = None  # 1-bit Gaussian codes are at their entropy already: kept as they are
                    made.append((w, table))
                    fixed += w * sym.size / 8
                    coded += stream_bytes(table, w, sym)
                tables[(kind, i, j)] = made
                save[kind][i, j] = (fixed - coded) / tokens
                tbytes[kind][i, j] = sum(t.lengths.size for _, t in made if t is not None)  # a byte a code length
        keep[i] = None
        print(f"layer {i}: keys save {save['k'][i].min():.1f}..{save['k'][i].max():.1f}, values "
              f"{save['v'][i].min():.1f}..{save['v'][i].max():.1f} bytes a coded token", flush=True)
    return tables, save, tbytes


def patch(save: dict, tbytes: dict) -> None:
    """allocate.layer_bytes less the coder's saving on every coded block, plus its tables (this process only)."""
    plain = allocate.layer_bytes

    def entropy_coded(calib, spec, context, sink, block, joint_calib=None, window=0, window_codec=None):
        items, fixed = plain(calib, spec, context, sink, block, joint_calib, window, window_codec)
        out = []
        for idx, (proxy, nbytes) in enumerate(items):
            i, kind = divmod(idx, 2)
            coded = allocate.held_tokens(spec, i, context, sink, block, window)[2]
            m = len(nbytes)
            out.append((proxy, nbytes - coded * save["kv"[kind]][i][:m] + (coded > 0) * tbytes["kv"[kind]][i][:m]))
        return out, fixed
    allocate.layer_bytes = entropy_coded


def held(model, tok, method: str, tables: dict, corpus: str | None) -> dict:
    """The cache of `method` after the first CONTEXT tokens: its bytes at fixed width, and with every coded block's
    symbols in tuple Huffman streams under the calibration's tables (whole bytes a stream, a 4-byte offset each, the
    tables' code lengths counted), against the symbols' own entropy (an oracle's bound; a class left at fixed
    width stays so in both)."""
    cache = kvshrink.from_method(method, model)
    ids = load_corpus_ids(tok, corpus, 2 * CONTEXT)[:CONTEXT][None]
    with torch.no_grad():
        for s in range(0, CONTEXT, CHUNK):
            model(ids[:, s:s + CHUNK], past_key_values=cache, use_cache=True)
    cache.settle()
    alloc = cache.allocation
    joints = [(allocate.JOINT, *c) for c in allocate.joint.CHOICES]
    fixed = coded = oracle = 0.0
    for i, layer in enumerate(cache.layers):
        for kind, st in zip("kv", layer.stores()):
            choice = tuple((alloc.keys if kind == "k" else alloc.values)[i])
            if choice[0] == allocate.JOINT:
                j = len(allocate.KEY_MENU) + joints.index(choice)
            else:
                j = (allocate.KEY_MENU if kind == "k" else allocate.VALUE_MENU).index(choice)
            made = tables[(kind, i, j)]
            coded += sum(t.lengths.size for _, t in made if t is not None)
            for p in st.body_parts():
                for (w, sym), (_, table) in zip(streams(st.codec, p), made):
                    fixed += w * sym.size / 8
                    coded += stream_bytes(table, w, sym)
                    oracle += (huffman.entropy_bits(np.bincount(sym.ravel(), minlength=1 << w)) / 8 if table is not None
                               else w * sym.size / 8)
    nbytes, fp16 = cache.nbytes(), cache.fp16_nbytes()
    return {"ratio_fixed_width": fp16 / nbytes, "ratio_huffman": fp16 / (nbytes - fixed + coded),
            "ratio_entropy": fp16 / (nbytes - fixed + oracle), "coded_bytes_saved": 1 - coded / fixed,
            "allocation": alloc.describe()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="auto-6x,auto-8x")
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--sections", default="quality", help="the bench's sections to run (quality, needle)")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", default="bench-results-entropy")
    ap.add_argument("--plain", action="store_true", help="the shipped allocation (sizes still measured both ways)")
    ap.add_argument("--only", choices=("k", "v"), default=None,
                    help="entropy-code the keys' or the values' blocks only")
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    kvshrink.prepare(model, "auto-6x", tok)
    calib, path = calibration_for(model, BLOCK)
    found = joint_for(model, BLOCK, path)
    tables, save, tbytes = calibrate_tables(model, tok, calib, found, spec)
    if args.only:  # the other side stays fixed-width: no saving, no tables
        other = "v" if args.only == "k" else "k"
        save[other][:], tbytes[other][:] = 0, 0
        for key in tables:
            if key[0] == other:
                tables[key] = [(w, None) for w, _ in tables[key]]
    if not args.plain:
        patch(save, tbytes)
    sizes = {m: held(model, tok, m, tables, args.corpus) for m in args.methods.split(",") if m.startswith("auto")}
    for m, r in sizes.items():
        print(m, json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sizes.json"), "w") as fh:
        json.dump(sizes, fh, indent=1)
    cli.main(["bench", "--sections", args.sections, "--methods", args.methods, "--segments", str(args.segments),
              "--out", args.out] + (["--corpus", args.corpus] if args.corpus else []))
    for m, r in sizes.items():
        print(f"{m}: {r['ratio_huffman']:.2f}x in tuple Huffman streams ({r['ratio_fixed_width']:.2f}x at fixed width, "
              f"{r['ratio_entropy']:.2f}x at the symbols' own entropy)")


if __name__ == "__main__":
    main()
