"""Entropy coding for the one budget (issue 19: "then entropy coding of the symbols"), measured before any coder or
kernel is written for it.

The `auto-*` presets store every symbol at its full width. Their symbols are far from uniform: a 2-bit min/max code
over a block's 128 keys puts most of them on the two inner levels. So a lossless coder would hold the same cache,
the same quality, in fewer bytes, and the budget those bytes free buys wider codes elsewhere.

1. Calibration (the budget calibration's own tokens, the last 4 x 512 of the corpus): every layer's keys and values
   go through every menu choice and every joint key choice. One static Huffman code over tuples of symbols
   (KVComp's, codecs/huffman.py) per side, choice and width, shared by all layers (per width for joint-basis keys),
   fitted to the pooled counts (+1, so that every tuple has a code). A table that would not shrink its symbols
   (1-bit Gaussian values) leaves them at fixed width.
2. Bytes as a store would hold them: each block of each head (and class) a stream decodable alone, in whole bytes,
   with a 4-byte offset; each table a cache uses counted once, with its decoding lookup as KVComp counts it (6 KB
   for a 10-bit window; the 12-bit, 8-symbol window of scripts/stream_decode_speed.py needs 40 KB). The saving per
   coded token is the fixed-width bytes less the streams.
3. Allocation: `allocate.layer_bytes` is replaced, for this process only, by the same bytes less that saving on
   every coded block, with `--reserve-tables` tables' bytes set aside (keys' stage, the window and the sink stay
   fixed-width), so `auto-Nx` allocates N x against the coded size.
4. Quality: the bench's quality protocol on those allocations, run in this process (`kvshrink bench`'s own code).
   The cache it measures holds the symbols at fixed width; a lossless coder would not change a single decoded value.
5. Size on the evaluated tokens: the first 2,048 tokens of the corpus prefilled in chunks of 64, each coded block's
   symbols coded under the calibration's tables (what a static coder would hold, tables and 10-bit lookups
   counted; also with 12-bit lookups), and beside it the symbols' own entropy (an oracle's bound, no tables).

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


def stream_counts(width: int, sym: np.ndarray) -> np.ndarray:
    """(streams, tuples): how often each tuple of symbols occurs in each stream (the tuple size KVComp's codes take
    for this width, `huffman.tuple_size`)."""
    n = 1 << width
    tup = huffman.tuples(sym, n, huffman.tuple_size(n)).astype(np.int64)
    size = n ** huffman.tuple_size(n)
    rows = tup + size * np.arange(tup.shape[0])[:, None]
    return np.bincount(rows.ravel(), minlength=size * tup.shape[0]).reshape(tup.shape[0], size)


def stream_bytes(table: huffman.Table | None, width: int, symbols: int, counts: np.ndarray) -> int:
    """Bytes of streams with these tuple counts under `table`: whole bytes each (a block decodable alone) and its
    offset; at fixed width where `table` is None (symbols the code would not shrink)."""
    if table is None:
        return width * symbols // 8
    bits = counts @ table.lengths.astype(np.int64)
    return int(((bits + 7) // 8).sum()) + OFFSET * counts.shape[0]


def table_bytes(tuples: int, window: int) -> int:
    """What a decoder holds for one table of `tuples` codes: the code lengths, the encoder's codes (uint32), and
    the decoding lookup for a window of `window` bits (10: KVComp's, up to 4 symbols an entry; 12: up to 8),
    counted as KVComp counts its tables (`shared_tensors`)."""
    multi = huffman.MULTI if window == huffman.MAX_LEN else 8
    return tuples * 5 + (1 << window) * (multi + 2)


def pooled(kind: str, j: int, width: int) -> tuple:
    """One table per side, menu choice and width, shared by every layer (joint-basis keys: per width)."""
    return (kind, "joint" if kind == "k" and j >= len(allocate.KEY_MENU) else j, width)


def calibrate_tables(model, tok, found, spec):
    """{(kind, choice, width) pooled: tuple Huffman table, or None where it would not shrink the symbols}, and per
    kind (layers, choices) arrays of the bytes saved per coded token under them, on the budget calibration's
    tokens."""
    ids, _ = calibration_ids(tok)
    n = (ids.shape[1] - SINK) // BLOCK * BLOCK
    keep = {i: ([], []) for i in range(spec.num_layers)}
    for layers in collect(model, ids, SINK):
        for i, (_, k, _, v, _) in layers.items():
            keep[i][0].append(k[:, :n].float())
            keep[i][1].append(v[:, :n].float())
    nk = len(allocate.KEY_MENU) + (len(found[0].proxy[0]) if found else 0)
    save = {"k": np.zeros((spec.num_layers, nk)), "v": np.zeros((spec.num_layers, len(allocate.VALUE_MENU)))}
    coded = {}  # (kind, layer, choice) -> (tokens, [(width, symbols, stream counts)])
    for i in range(spec.num_layers):
        # each sequence's blocks coded on their own, as a cache codes them
        k, v = (torch.stack(x)[:, None].flatten(0, 1) for x in keep.pop(i))
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
                if codec is not None:
                    classes = streams(codec, codec.encode(x, BLOCK))
                    counted = [(w, m.size, stream_counts(w, m)) for w, m in classes]
                    coded[(kind, i, j)] = (k.shape[0] * k.shape[2], counted)
        print(f"layer {i}: every choice coded", flush=True)
    pooled_counts = {}
    for (kind, _, j), (_, classes) in coded.items():
        for w, _, c in classes:
            key = pooled(kind, j, w)
            pooled_counts[key] = pooled_counts.get(key, 0) + c.sum(0)
    tables = {}
    for key, c in pooled_counts.items():
        t = huffman.Table.from_counts(c + 1, n_symbols=1 << key[2])
        tables[key] = t if t.bits(c) < 0.98 * key[2] * t.k * c.sum() else None  # else fixed width
    for (kind, i, j), (tokens, classes) in coded.items():
        fixed = sum(w * m / 8 for w, m, _ in classes)
        held = sum(stream_bytes(tables[pooled(kind, j, w)], w, m, c) for w, m, c in classes)
        save[kind][i, j] = (fixed - held) / tokens
    used = sum(t is not None for t in tables.values())
    print(f"{used} of {len(tables)} pooled tables shrink their symbols", flush=True)
    return tables, save


def patch(save: dict, reserve: float) -> None:
    """allocate.layer_bytes less the coder's saving on every coded block, with `reserve` bytes set aside for the
    tables a cache holds (this process only)."""
    plain = allocate.layer_bytes

    def entropy_coded(calib, spec, context, sink, block, joint_calib=None, window=0, window_codec=None, coded=None):
        if coded is not None:
            raise SystemExit("the study models the coder itself: run it on methods without entropy=true")
        items, fixed = plain(calib, spec, context, sink, block, joint_calib, window, window_codec)
        out = []
        for idx, (proxy, nbytes) in enumerate(items):
            i, kind = divmod(idx, 2)
            coded = allocate.held_tokens(spec, i, context, sink, block, window)[2]
            out.append((proxy, nbytes - coded * save["kv"[kind]][i][:len(nbytes)]))
        return out, fixed + reserve
    allocate.layer_bytes = entropy_coded


def held(model, tok, method: str, tables: dict, corpus: str | None) -> dict:
    """The cache of `method` after the first CONTEXT tokens: its bytes at fixed width, and with every coded block's
    symbols in tuple Huffman streams under the calibration's pooled tables (whole bytes a stream, a 4-byte offset
    each, each table used counted once with its decoding lookup, `table_bytes`), against the symbols' own entropy
    (an oracle's bound, no tables; a class left at fixed width stays so in both)."""
    cache = kvshrink.from_method(method, model)
    ids = load_corpus_ids(tok, corpus, 2 * CONTEXT)[:CONTEXT][None]
    with torch.no_grad():
        for s in range(0, CONTEXT, CHUNK):
            model(ids[:, s:s + CHUNK], past_key_values=cache, use_cache=True)
    cache.settle()
    alloc = cache.allocation
    joints = [(allocate.JOINT, *c) for c in allocate.joint.CHOICES]
    fixed = coded = oracle = 0.0
    used = set()
    for i, layer in enumerate(cache.layers):
        for kind, st in zip("kv", layer.stores()):
            choice = tuple((alloc.keys if kind == "k" else alloc.values)[i])
            if choice[0] == allocate.JOINT:
                j = len(allocate.KEY_MENU) + joints.index(choice)
            else:
                j = (allocate.KEY_MENU if kind == "k" else allocate.VALUE_MENU).index(choice)
            for p in st.body_parts():
                for w, sym in streams(st.codec, p):
                    table = tables[pooled(kind, j, w)]
                    fixed += w * sym.size / 8
                    coded += stream_bytes(table, w, sym.size, stream_counts(w, sym))
                    oracle += (huffman.entropy_bits(np.bincount(sym.ravel(), minlength=1 << w)) / 8
                               if table is not None else w * sym.size / 8)
                    if table is not None:
                        used.add(pooled(kind, j, w))
    nbytes, fp16 = cache.nbytes(), cache.fp16_nbytes()
    lut = {win: sum(table_bytes(tables[key].lengths.size, win) for key in used) for win in (10, 12)}
    return {"ratio_fixed_width": fp16 / nbytes, "ratio_huffman": fp16 / (nbytes - fixed + coded + lut[10]),
            "ratio_huffman_wide": fp16 / (nbytes - fixed + coded + lut[12]),
            "ratio_entropy": fp16 / (nbytes - fixed + oracle), "tables": len(used), "table_bytes": lut,
            "coded_bytes_saved": 1 - coded / fixed, "allocation": alloc.describe()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="auto-6x,auto-8x")
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--sections", default="quality", help="the bench's sections to run (quality, needle)")
    ap.add_argument("--reserve-tables", type=int, default=12,
                    help="tables whose bytes the allocation sets aside (KVComp's 10-bit lookups)")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--out", default="bench-results-entropy")
    ap.add_argument("--plain", action="store_true", help="the shipped allocation (sizes still measured both ways)")
    ap.add_argument("--only", choices=("k", "v"), default=None,
                    help="entropy-code the keys' or the values' blocks only")
    args = ap.parse_args()
    model, tok = load_model()
    spec = spec_from_config(model.config)
    kvshrink.prepare(model, "auto-6x", tok)
    _, path = calibration_for(model, BLOCK)
    found = joint_for(model, BLOCK, path)
    tables, save = calibrate_tables(model, tok, found, spec)
    if args.only:  # the other side stays fixed-width: no saving, no tables
        other = "v" if args.only == "k" else "k"
        save[other][:] = 0
        for key in tables:
            if key[0] == other:
                tables[key] = None
    if not args.plain:  # tables set aside as the first runs used them (see the printed count)
        patch(save, args.reserve_tables * table_bytes(64, huffman.MAX_LEN))
    sizes = {m: held(model, tok, m, tables, args.corpus) for m in args.methods.split(",") if m.startswith("auto")}
    for m, r in sizes.items():
        print(m, json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sizes.json"), "w") as fh:
        json.dump(sizes, fh, indent=1)
    cli.main(["bench", "--sections", args.sections, "--methods", args.methods, "--segments", str(args.segments),
              "--out", args.out] + (["--corpus", args.corpus] if args.corpus else []))
    for m, r in sizes.items():
        print(f"{m}: {r['ratio_huffman']:.2f}x in tuple Huffman streams, {r['tables']} tables with 10-bit lookups "
              f"({r['ratio_huffman_wide']:.2f}x with 12-bit ones; {r['ratio_fixed_width']:.2f}x at fixed width, "
              f"{r['ratio_entropy']:.2f}x at the symbols' own entropy)")


if __name__ == "__main__":
    main()
