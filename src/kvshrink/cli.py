"""Command line: `kvshrink bench | generate | serve | calibrate | methods`.

Bad input prints one line naming the problem and exits with code 2. The top floor: methods and
options are checked from the registry (no torch) before anything heavy loads; the commands that
need torch and a model import them inside their function, so `kvshrink methods` or a typo
answers at once instead of after 8 s of imports.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import families  # noqa: F401  (registers every family's presets: light, no torch)
from .corpus import check_corpus
from .errors import KvshrinkError
from .registry import REGISTRY, get_method, method_names, options_help


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise KvshrinkError(message)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvshrink", description="Compressed KV caches for Hugging Face causal LMs.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    b = sub.add_parser("bench", help="benchmark methods against an uncompressed cache")
    b.add_argument("--quick", action="store_true", help="a short run (~8 min): 2 segments of 1024, 2k needles, 1k/2k speed")
    b.add_argument("--methods", type=_csv, help="comma-separated method names, options after colons "
                   "(int4:window=32); default: the bench set. `kvshrink methods` lists names and options")
    b.add_argument("--model", help="HF model id or local folder (default: bundled SmolLM2-135M-Instruct)")
    b.add_argument("--corpus", help="text file for perplexity (default: WikiText-2 test from shared/)")
    b.add_argument("--out", default="bench-results", help="output folder (results.json, results.md, plot)")
    b.add_argument("--segments", type=int)
    b.add_argument("--seg-len", type=int)
    b.add_argument("--chunk", type=int)
    b.add_argument("--needle-lengths", type=_ints)
    b.add_argument("--speed-contexts", type=_ints)
    b.add_argument("--decode-steps", type=int, help="decode steps per method and context, the first not timed "
                                                     "(default 16; 256 or more crosses block boundaries: p99 shows "
                                                     "coding)")
    b.add_argument("--needle-depths", type=lambda t: tuple(float(x) for x in _csv(t)))
    b.add_argument("--direct-prefill", type=int, help="prompt tokens for the end-to-end prefill time and peak memory")
    b.add_argument("--device", help="cpu (default), cuda or cuda:N: where the model, the caches and the kernels run")
    b.add_argument("--sections", type=_csv, help="subset of quality,needle,speed,serve,sp (serve, sp: not by default)")
    b.add_argument("--serve-rates", type=lambda t: tuple(float(x) for x in _csv(t)),
                   help="serve: request rates per second (inf: all at once); default 0.5,1,inf")
    b.add_argument("--serve-requests", type=int, help="serve: requests per run (default 24)")
    b.add_argument("--serve-budget", help="serve: the KV budget every method gets (default 32MB)")
    b.add_argument("--serve-time-limit", type=float, help="serve: seconds per run at most (default 600)")
    b.add_argument("--sp-contexts", type=_ints, help="sp: prompt lengths (default 4096,8184)")
    b.add_argument("--sp-ranks", type=_ints, help="sp: process counts (default 2,4)")
    b.add_argument("--sp-wires", type=_csv, help="sp: how prefill messages cross: model, int8, int4 (default model)")
    b.add_argument("--sp-exchanges", type=_csv,
                   help="sp: ZDC states cross reduced, kv (keys and values only reduced) or full (default reduced)")

    g = sub.add_parser("generate", help="generate text with a compressed cache and report its memory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--method", default="int4", help="a registered name, options after colons (`kvshrink methods`)")
    g.add_argument("--model")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--device", help="cpu (default), cuda or cuda:N")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--save-cache", metavar="PATH",
                   help="save the compressed cache and its tokens (int, auto, zdc, rvq and kvcomp methods)")
    g.add_argument("--resume", metavar="PATH", help="continue from a saved cache: the prompt is appended as raw "
                                                     "text to the tokens it holds, which are not recomputed")
    g.add_argument("--nproc", type=int, help="run on N processes (torch.distributed, gloo): sequence-parallel "
                                             "prefill, then decode over a cache sharded by KV heads (docs/sp.md)")
    g.add_argument("--wire", default="model", choices=("model", "int8", "int4"),
                   help="with --nproc or torchrun: how the prefill's queries, keys, values and outputs cross: "
                        "model (as they are), int8 or int4 (int-coded, lossy; docs/sp.md)")
    g.add_argument("--exchange", default="reduced", choices=("reduced", "kv", "full"),
                   help="with --nproc or torchrun, ZDC methods: queries, keys, values and outputs cross at the "
                        "coordinates the cache keeps (reduced, FDC), keys and values only (kv), or all in full "
                        "(the single process's output; docs/sp.md)")

    s = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching over compressed caches")
    s.add_argument("--model")
    s.add_argument("--method", default="int4", help="a registered name, options after colons (`kvshrink methods`)")
    s.add_argument("--kv-budget", default="256MB", help="bytes all requests' caches may hold (256MB, 1GiB, ...)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-running", type=int, default=64, help="most sequences in the running batch")
    s.add_argument("--step-tokens", type=int, default=256, help="most new tokens in one forward call (prompt chunks)")
    s.add_argument("--queue-limit", type=int, default=256, help="waiting requests beyond which the server answers 429")
    s.add_argument("--no-prefix-reuse", action="store_true",
                   help="do not keep caches for later prompts that start with the same tokens (docs/serve.md)")
    s.add_argument("--no-park", action="store_true",
                   help="a preempted request's cache is freed and recomputed, not parked on disk")
    s.add_argument("--probe-tokens", type=int, default=None,
                   help="prompt tokens whose cache bytes are measured at start for the byte model (default 1024; "
                        "past them it grows at the measured rate: docs/serve.md)")
    s.add_argument("--decode-probe", type=int, default=None,
                   help="decode steps measured at start for the byte model (default: two blocks, which covers "
                        "any request; fewer starts faster and may reserve too little: docs/serve.md)")

    c = sub.add_parser("calibrate", help="calibrate a method that needs it (zdc: low-rank bases and loss proxies; "
                                         "rvq: residual codebooks; auto: the budget's loss of every width)")
    c.add_argument("--method", required=True, help="zdc, rvq or auto")
    c.add_argument("--model")
    c.add_argument("--corpus", help="text file (default: WikiText-2 test; its last tokens are used)")
    c.add_argument("--sequences", type=int, help="calibration sequences (default: zdc 4, rvq 8)")
    c.add_argument("--length", type=int, help="tokens a calibration sequence (default 512; auto on a model that "
                   "mixes sliding and full layers: 2 sequences of 2,048)")
    c.add_argument("--key-basis", default="query", help="query (query-weighted PCA), joint or key")
    c.add_argument("--value-basis", default="output", help="output (o_proj-weighted PCA) or pca")
    c.add_argument("--group", type=int, default=16, help="rvq: channels per group")
    c.add_argument("--size", type=int, default=256, help="rvq: codewords per level (a power of two, at most 256)")
    c.add_argument("--depth", type=int, default=8, help="rvq: residual levels learned (1 to 8)")
    c.add_argument("--key-grouping", default="strided", help="rvq: strided or contiguous channel groups for keys")
    c.add_argument("--value-grouping", default="contiguous", help="rvq: strided or contiguous groups for values")
    c.add_argument("--iters", type=int, default=10, help="rvq: k-means iterations per level")
    c.add_argument("--block", type=int, default=128, help="auto: tokens per coded block (as the method's block=)")
    c.add_argument("--out", help="file to write (default: where the method looks for this model)")

    m = sub.add_parser("methods", help="list registered methods and each family's options")
    m.add_argument("--family", help="only this family's methods (quant, lowrank, evict, rvq, kvcomp, budget, peer)")
    return p


def cmd_calibrate(args) -> None:
    # heavy imports here, not at the top: see the module doc
    from .core.calibfile import calibration_ids
    from .families.budget import allocate as budget
    from .families.lowrank import transform as zdc
    from .families.rvq import calibrate as rvq_calib
    from .models import load_model
    from .spec import spec_from_config

    if args.method not in ("zdc", "rvq", "auto"):
        raise KvshrinkError(f"no calibration for method {args.method!r}; calibrated methods: zdc, rvq, auto")
    if args.block < 1:
        raise KvshrinkError("--block must be at least 1")
    if (args.sequences is not None and args.sequences < 1) or (args.length is not None and args.length < 8):
        raise KvshrinkError("--sequences must be at least 1 and --length at least 8")
    if args.method == "rvq":
        if args.iters < 1:
            raise KvshrinkError("--iters must be at least 1")
        rvq_calib.check_layout(args.size, args.depth, args.key_grouping, args.value_grouping)
    check_corpus(args.corpus)
    model, tok = load_model(args.model)
    sequences, length = (budget.calibration_shape(spec_from_config(model.config)) if args.method == "auto"
                         else (8 if args.method == "rvq" else 4, 512))
    ids, desc = calibration_ids(tok, args.corpus, args.sequences or sequences, args.length or length)
    if args.method == "rvq":
        return _calibrate_rvq(args, model, ids, desc, rvq_calib)
    if args.method == "auto":
        t0 = time.time()
        path = args.out or budget.default_path(model, desc, args.block)
        budget.measure(model, ids, desc, block=args.block).save(path)
        print(f"auto calibration: {ids.numel()} tokens (corpus tokens {desc['tokens'][0]}..{desc['tokens'][1]}), "
              f"{time.time() - t0:.0f} s -> {path}")
        t0, side = time.time(), budget.vector.path_beside(path)  # vector value levels (vector=true), beside it
        budget.measure_vector(model, ids, desc, block=args.block).save(side)
        print(f"vector value calibration: {time.time() - t0:.0f} s -> {side}")
        t0, side = time.time(), budget.heads.path_beside(path)  # each KV head's share (heads=N), beside it
        budget.measure_heads(model, ids, desc, block=args.block).save(side)
        print(f"head share calibration: {time.time() - t0:.0f} s -> {side}")
        if spec_from_config(model.config).rope:  # joint-basis key choices, in the file beside it
            t0, side = time.time(), budget.joint.path_beside(path)
            found = budget.measure_joint(model, ids, desc, block=args.block)
            found.save(side)
            print(f"joint key calibration: {time.time() - t0:.0f} s -> {side}")
            t0, tables = time.time(), budget.coded.path_beside(side)  # their code tables (entropy=true), beside it
            budget.coded.calibrate(model, ids, found, desc, block=args.block, menu=budget.KEY_MENU).save(tables)
            print(f"key code tables: {time.time() - t0:.0f} s -> {tables}")
        return None
    print(f"ZDC calibration of {ids.numel()} tokens: about a minute on the bundled model, 2 cores", file=sys.stderr)
    t0 = time.time()
    calib = zdc.calibrate(model, ids, desc, key_basis=args.key_basis, value_basis=args.value_basis)
    path = args.out or zdc.default_calibration_path(model)
    calib.save(path)
    ek = calib.ek / calib.ek.sum(-1, keepdim=True)
    ev = calib.ev / calib.ev.sum(-1, keepdim=True)
    half = calib.uk.shape[-1] // 2
    print(f"ZDC calibration: {ids.numel()} tokens (corpus tokens {desc['tokens'][0]}..{desc['tokens'][1]}), "
          f"{time.time() - t0:.0f} s -> {path}")
    print(f"energy kept by half the dimensions: keys {100 * ek[..., :half].sum(-1).mean():.1f}% "
          f"(min {100 * ek[..., :half].sum(-1).min():.1f}%), values {100 * ev[..., :half].sum(-1).mean():.1f}% "
          f"(min {100 * ev[..., :half].sum(-1).min():.1f}%)")


def _calibrate_rvq(args, model, ids, desc, rvq_calib) -> None:
    print(f"RVQ codebooks from {ids.numel()} tokens: a few minutes on the bundled model, 2 cores", file=sys.stderr)
    t0 = time.time()
    calib = rvq_calib.calibrate(model, ids, desc, args.group, args.size, args.depth, args.key_grouping,
                                args.value_grouping, args.iters,
                                progress=lambda i, n: print(f"  layer {i}/{n}", end="\r", file=sys.stderr))
    path = args.out or rvq_calib.default_path(model, args.group, args.size, args.key_grouping, args.value_grouping)
    calib.save(path)
    print(f"RVQ calibration: {ids.numel()} tokens (corpus tokens {desc['tokens'][0]}..{desc['tokens'][1]}), "
          f"{calib.header['vectors_per_layer']} vectors per layer, {time.time() - t0:.0f} s -> {path}")
    for name in ("key", "value"):
        left = column_means(calib.header[f"{name}_residual"])
        print(f"{name} energy left after levels 1..{args.depth}: " + " ".join(f"{100 * x:.1f}%" for x in left))


def column_means(rows: list) -> list:
    """Column means of a list of equal-length rows."""
    return [sum(col) / len(col) for col in zip(*rows)]


def cmd_bench(args) -> None:
    for name in args.methods or ():
        get_method(name)  # fail before torch and the model load
    if not args.sections or "quality" in args.sections:
        check_corpus(args.corpus)
    from .bench import BenchConfig, run_bench, table
    from .dist.bench import sp_table
    from .serve.load import serve_table

    over = {k: v for k, v in {
        "model": args.model, "corpus": args.corpus, "methods": args.methods, "out": args.out,
        "segments": args.segments, "seg_len": args.seg_len, "chunk": args.chunk,
        "needle_lengths": args.needle_lengths, "speed_contexts": args.speed_contexts,
        "decode_steps": args.decode_steps,
        "needle_depths": args.needle_depths, "direct_prefill": args.direct_prefill,
        "sections": tuple(args.sections) if args.sections else None,
        "serve_methods": tuple(args.methods) if args.methods else None, "serve_rates": args.serve_rates,
        "serve_requests": args.serve_requests, "serve_budget": args.serve_budget,
        "serve_time_limit": args.serve_time_limit, "device": args.device,
        "sp_methods": tuple(args.methods) if args.methods else None, "sp_contexts": args.sp_contexts,
        "sp_ranks": args.sp_ranks, "sp_wires": tuple(args.sp_wires) if args.sp_wires else None,
        "sp_exchanges": tuple(args.sp_exchanges) if args.sp_exchanges else None,
    }.items() if v is not None}
    cfg = BenchConfig.quick(**over) if args.quick else BenchConfig(**over)
    res = run_bench(cfg)
    if "serve" in res:
        print(serve_table(res["serve"]))
    if "sp" in res:
        print(sp_table(res["sp"]))
    if any(k in res for k in ("quality", "speed", "needle")):
        print(table(res))
    print(f"\nwrote {cfg.out}/results.json, results.md" + (", ratio_vs_ppl.png" if "quality" in res else "")
          + (", serve.png" if "serve" in res else "") + (", sp.png" if "sp" in res else ""))


def cmd_generate(args) -> None:
    method = get_method(args.method)  # fail before torch and the model load
    if args.max_new_tokens < 1:
        raise KvshrinkError("--max-new-tokens must be at least 1")
    if args.nproc is not None and args.nproc < 1:  # before the model loads (a split over 0 ranks has no meaning)
        raise KvshrinkError(f"--nproc must be at least 1, got {args.nproc}")
    if args.save_cache and not method.config.can_save:
        raise KvshrinkError(f"{args.method} caches cannot be saved (eviction, importance-aware and peer caches keep "
                            "tokens outside the stores a file holds); use an int, auto, zdc, rvq or kvcomp method")
    import torch

    from .api import from_method, load_cache, prepare, saved_method
    from .compat import with_cache
    from .core.cache import cache_nbytes
    from .dist.launch import torchrun_env
    from .models import device_from, load_model
    from .spec import spec_from_config

    if args.nproc is not None or torchrun_env():
        return _generate_parallel(args)
    if args.wire != "model" or args.exchange != "reduced":
        raise KvshrinkError(f"--{'wire' if args.wire != 'model' else 'exchange'} applies to runs on several "
                            "processes: add --nproc N, or start under torchrun")
    device = device_from(args.device)  # before the weights load
    model, tok = load_model(args.model, device=device)
    spec = spec_from_config(model.config)
    ids = _prompt_ids(tok, args)
    total = ids.shape[1] + args.max_new_tokens
    if spec.max_context and total > spec.max_context:
        raise KvshrinkError(f"prompt of {ids.shape[1]} tokens + {args.max_new_tokens} new tokens is longer than "
                            f"the model allows ({spec.max_context})")
    if args.resume:  # the model is prepared for the method the file was saved with, whatever --method says
        saved = saved_method(args.resume)
        if saved is None:
            raise KvshrinkError(f"cache file {args.resume!r} is missing or not a kvshrink cache file")
        method = get_method(saved)
    model = prepare(model, method, tok)
    if args.resume:
        cache = load_cache(args.resume, model)
        if cache.ids is None:
            raise KvshrinkError(f"cache file {args.resume!r} holds no tokens to continue from")
        new = tok(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([cache.ids.cpu(), new], 1)  # generate feeds only what the cache does not hold
        if spec.max_context and ids.shape[1] + args.max_new_tokens > spec.max_context:
            raise KvshrinkError(f"saved {cache.ids.shape[1]} tokens + prompt + new tokens exceed the model's "
                                f"{spec.max_context}")
    else:
        cache = from_method(method, model)
    ids = ids.to(device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **with_cache(model, cache),
                             max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    held, tokens = cache_nbytes(cache), cache.get_seq_length()
    if args.save_cache:
        size = cache.save(args.save_cache, model, ids=out[:, :tokens])
        print(f"saved {tokens} tokens to {args.save_cache} ({size / 1024:.1f} KiB)")
    fp16 = spec.fp16_bytes(tokens)
    label = getattr(cache, "method", None) or args.method
    print(f"\n[{label}] cache holds {held / 1024:.1f} KiB for {tokens} tokens; "
          f"fp16 cache: {fp16 / 1024:.1f} KiB ({fp16 / held:.2f}x); "
          f"float32 DynamicCache: {2 * fp16 / 1024:.1f} KiB ({2 * fp16 / held:.2f}x)")
    kinds = cache.bytes_by_kind() if hasattr(cache, "bytes_by_kind") else {}
    if "sliding" in kinds:  # what each kind of layer holds, against fp16 holding the same tokens
        print("  " + "; ".join(f"{kind} layers {b / 1024:.1f} KiB, fp16 {f / 1024:.1f} KiB ({f / b:.2f}x)"
                               for kind, (b, f) in kinds.items()))
    if tokens < 512:
        print("(short contexts show little gain: the first tokens stay float16 as attention sinks and a "
              "block fills before it is coded; try a prompt of a few thousand tokens)")


def _prompt_ids(tok, args):
    if args.raw or not tok.chat_template:
        return tok(args.prompt, return_tensors="pt").input_ids
    return tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True).input_ids


def _generate_parallel(args) -> None:
    """--nproc N: start the ranks here; under torchrun: this process is one of them (docs/sp.md)."""
    for flag in ("save_cache", "resume", "device"):
        if getattr(args, flag):
            raise KvshrinkError(f"{'--nproc' if args.nproc else 'torchrun'} does not combine with "
                                f"--{flag.replace('_', '-')}")
    from .dist.launch import join, launch, torchrun_env
    from .dist.sp import check, run_rank
    from .models import load_model

    model, tok = load_model(args.model)
    ids = _prompt_ids(tok, args)
    run_args = (args.model, args.method, ids, args.max_new_tokens, False, args.wire, False, args.exchange)
    if torchrun_env():
        world = int(os.environ["WORLD_SIZE"])
        if args.nproc is not None and args.nproc != world:
            raise KvshrinkError(f"--nproc {args.nproc} differs from torchrun's {world} processes; leave it out")
        res = join(run_rank, run_args, first=(check, (model, tok, args.method, ids.shape[1], args.max_new_tokens,
                                                      world, args.wire, args.exchange)))
        if res is None:  # rank 0 reports
            return
    else:
        check(model, tok, args.method, ids.shape[1], args.max_new_tokens, args.nproc, args.wire, args.exchange)
        del model
        res = launch(run_rank, args.nproc, run_args)
    tokens = res[0]["tokens"]
    if tok.eos_token_id in tokens:
        tokens = tokens[:tokens.index(tok.eos_token_id)]
    print(tok.decode(tokens, skip_special_tokens=True))
    print(f"\n[{args.method}] {len(res)} processes, {ids.shape[1]} prompt tokens"
          + (f", {args.wire} on the wire" if args.wire != "model" else "")
          + {"full": ", keys and values exchanged in full", "kv": ", queries and outputs exchanged in full"}.get(
              args.exchange, ""))
    for r in res:
        (s, e), (a, b), layers = r["token_range"], r["heads"], r["layers"]
        sent = sum(r["sent"].values())
        heads = f"KV heads {a}..{b - 1}" if b > a else "no KV heads"
        print(f"  rank {r['rank']}: tokens {s}..{e - 1}, {heads} ({r['held'] / 1024:.1f} KiB held); "
              f"prefill sent {sent / 1024:.1f} KiB ({sent / layers / 1024:.1f} KiB a layer: "
              + ", ".join(f"{k} {v / 1024:.1f}" for k, v in r["sent"].items())
              + f"), {r['prefill_s']:.2f} s of which {r['prefill_comm_s']:.2f} s in collectives; "
              f"decode {r['decode_s']:.2f} s ({r['decode_comm_s']:.2f} s)")


def cmd_serve(args) -> None:
    get_method(args.method)  # fail before torch and the model load
    for name in ("port", "max_running", "step_tokens", "queue_limit"):
        if getattr(args, name) < 1 or (name == "port" and args.port > 65535):
            raise KvshrinkError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range")
    if args.decode_probe is not None and args.decode_probe < 0:
        raise KvshrinkError(f"--decode-probe {args.decode_probe} is out of range")
    if args.probe_tokens is not None and args.probe_tokens < 1:
        raise KvshrinkError(f"--probe-tokens {args.probe_tokens} is out of range")
    from .serve.server import PROBE_TOKENS, build, parse_bytes, run

    budget = parse_bytes(args.kv_budget)
    app, _, _ = build(args.model, args.method, budget, args.max_running, args.step_tokens, args.queue_limit,
                      probe=args.probe_tokens or PROBE_TOKENS, prefix=not args.no_prefix_reuse, park=not args.no_park,
                      decode_steps=args.decode_probe)
    print(f"kvshrink serve: {args.method} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    got = run(app, args.host, args.port)
    print(f"kvshrink serve: stopped{' on signal ' + str(got[-1]) if got else ''}", flush=True)


def cmd_methods(args) -> None:
    """Every registered name with its description, then each family's options, from the config fields."""
    families_seen = {}
    for name in method_names():
        m = REGISTRY[name]
        if args.family and m.family != args.family:
            continue
        families_seen.setdefault(type(m.config), m.config)
        print(f"{name:22s} {'[peer] ' if m.family == 'peer' else ''}{m.description}")
    if args.family and not families_seen:
        raise KvshrinkError(f"unknown family {args.family!r}; use quant, lowrank, evict, rvq, kvcomp or peer")
    for cls, config in families_seen.items():
        lines = options_help(config)
        if lines:
            print(f"\n{cls.__name__} options ({config.family}), as name:option=value:")
            for line in lines:
                print(f"  {line}")


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        commands = {"bench": cmd_bench, "generate": cmd_generate, "serve": cmd_serve, "methods": cmd_methods,
                    "calibrate": cmd_calibrate}
        commands[args.cmd](args)
    except KvshrinkError as err:
        if str(err):  # empty: another process said it (a torchrun rank other than 0)
            print(f"kvshrink: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvshrink: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
