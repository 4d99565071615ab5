"""`kvshrink bench`: every method beside an uncompressed cache, in one run.

Writes results.json, results.md (tables) and ratio_vs_ppl.png to --out.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import matplotlib
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import DynamicCache

from .api import from_method, prepare
from .core.calibfile import evaluating
from .corpus import default_corpus, load_corpus_ids, segments
from .dist.bench import SP_METHODS, sp_plot, sp_section, sp_table
from .dist.sp import EXCHANGES
from .dist.wire import NAMES as WIRES
from .errors import KvshrinkError
from .eval.needle import run_needles
from .eval.perplexity import evaluate_quality
from .eval.speed import measure_direct_prefill, measure_speed
from .models import device_from, load_config, load_model
from .registry import REGISTRY, get_method, method_names
from .serve.load import RATES, SERVE_METHODS, Workload, serve_plot, serve_section, serve_table
from .serve.server import parse_bytes
from .spec import spec_from_config

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

REF = "dynamic-fp32"
DEFAULT_PEERS = ("hf-quanto-int4", "hf-quanto-int2", "hf-hqq-int4", "hf-hqq-int2")


def default_methods() -> list[str]:
    names = [n for n in method_names("ours") if REGISTRY[n].default]
    return names + [p for p in DEFAULT_PEERS if p in REGISTRY]


@dataclass
class BenchConfig:
    model: str | None = None
    corpus: str | None = None
    methods: list[str] = field(default_factory=default_methods)
    out: str = "bench-results"
    segments: int = 8
    seg_len: int = 2048
    chunk: int = 64
    needle_lengths: tuple = (2048, 4096, 8192)
    needle_depths: tuple = (0.1, 0.5, 0.9)
    speed_contexts: tuple = (1024, 4096, 8176)  # 8176 + 16 decode steps = the 8192 limit
    decode_steps: int = 16
    direct_prefill: int = 1024
    sections: tuple = ("speed", "quality", "needle")
    serve_methods: tuple = SERVE_METHODS  # the serve section (not run by default: --sections serve)
    serve_rates: tuple = RATES
    serve_requests: int = 24
    serve_budget: str = "32MB"
    serve_time_limit: float = 600.0  # seconds per run; requests still running then count as not completed
    sp_methods: tuple = SP_METHODS  # the sp section (not run by default: --sections sp)
    sp_contexts: tuple = (4096, 8184)  # + sp_new_tokens = the 8192 limit
    sp_ranks: tuple = (2, 4)  # the bundled model has 3 KV heads: of 4 ranks, one attends for none
    sp_new_tokens: int = 8
    sp_wires: tuple = ("model",)  # add int8/int4 for int-coded prefill messages (dist/wire.py)
    sp_exchanges: tuple = ("reduced",)  # add "full": ZDC keys and values sent whole (dist/sp.py)
    device: str = "cpu"  # where the model, the caches and the kernels run (cpu, cuda, cuda:N)

    @classmethod
    def quick(cls, **kw) -> "BenchConfig":
        base = dict(segments=2, seg_len=1024, needle_lengths=(2048,), needle_depths=(0.5,),
                    speed_contexts=(1024, 2040), decode_steps=8, direct_prefill=512)
        return cls(**{**base, **kw})


def validate(cfg: BenchConfig, spec) -> None:
    for name in (*cfg.methods, *(cfg.serve_methods if "serve" in cfg.sections else ()),
                 *(cfg.sp_methods if "sp" in cfg.sections else ())):
        get_method(name)
    if not cfg.methods:
        raise KvshrinkError("no methods to benchmark")
    unknown = set(cfg.sections) - {"quality", "needle", "speed", "serve", "sp"}
    if unknown:
        raise KvshrinkError(f"unknown bench section(s) {', '.join(sorted(unknown))}; "
                            "use quality, needle, speed, serve, sp")
    if "sp" in cfg.sections:
        if device_from(cfg.device).type != "cpu":
            raise KvshrinkError("the sp section runs on the CPU only (gloo between processes); drop --device")
        if not cfg.sp_wires or any(w not in WIRES for w in cfg.sp_wires):
            raise KvshrinkError(f"sp wire formats are model, int8 and int4, got {cfg.sp_wires}")
        if not cfg.sp_exchanges or any(x not in EXCHANGES for x in cfg.sp_exchanges):
            raise KvshrinkError(f"sp exchanges are {', '.join(EXCHANGES)}, got {cfg.sp_exchanges}")
        if not cfg.sp_ranks or any(not (isinstance(n, int) and n >= 1) for n in cfg.sp_ranks):
            raise KvshrinkError(f"sp process counts must be positive integers, got {cfg.sp_ranks}")
        if not cfg.sp_contexts or min(cfg.sp_contexts) < max(cfg.sp_ranks):
            raise KvshrinkError("every sp prompt needs at least one token per process")
    if "serve" in cfg.sections:
        if device_from(cfg.device).type != "cpu":
            raise KvshrinkError("the serve section runs on the CPU only (its batched kernel is numba's); "
                                "drop --device or the serve section")
        parse_bytes(cfg.serve_budget)
        if cfg.serve_requests < 1 or not cfg.serve_rates or any(not r > 0 for r in cfg.serve_rates):
            raise KvshrinkError("the serve section needs at least one request and positive rates")
    limit = spec.max_context
    lengths = {"quality": [cfg.seg_len], "needle": list(cfg.needle_lengths),
               "speed": [c + cfg.decode_steps for c in cfg.speed_contexts],
               "sp": [c + cfg.sp_new_tokens for c in cfg.sp_contexts]}
    longest = max(n for s in cfg.sections for n in lengths.get(s, [0]))  # only the sections that run
    if limit and longest > limit:
        raise KvshrinkError(f"a context of {longest} tokens is longer than the model allows ({limit})")
    if cfg.decode_steps < 2:
        raise KvshrinkError(f"decode steps must be at least 2 (the first is not timed), got {cfg.decode_steps}")
    if cfg.segments < 1 or cfg.seg_len < 2 or cfg.chunk < 1:
        raise KvshrinkError("segments, segment length and chunk must be positive")
    if "speed" in cfg.sections and min(cfg.speed_contexts, default=0) < 1:
        raise KvshrinkError(f"speed contexts must be at least 1 token, got {cfg.speed_contexts}")
    if "needle" in cfg.sections:
        if not cfg.needle_depths or any(not 0.0 <= d <= 1.0 for d in cfg.needle_depths):
            raise KvshrinkError(f"needle depths are fractions of the haystack, 0 to 1; got {cfg.needle_depths}")
        if not cfg.needle_lengths or min(cfg.needle_lengths) < 1:
            raise KvshrinkError(f"needle lengths must be positive token counts, got {cfg.needle_lengths}")


def _progress():
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn())


def run_bench(cfg: BenchConfig, log=print) -> dict:
    t_start = time.time()
    torch.manual_seed(0)
    validate(cfg, spec_from_config(load_config(cfg.model)))  # lengths and sections, before the weights load
    device = device_from(cfg.device)
    model, tok = load_model(cfg.model, device=device)
    if set(cfg.sections) <= {"serve", "sp"}:
        res = {"model": cfg.model or "SmolLM2-135M-Instruct (bundled)", "config": asdict(cfg),
               "machine": _machine(device)}
        return _serve(res, cfg, model, tok, t_start, log)
    spec = spec_from_config(model.config)
    methods = {n: get_method(n) for n in cfg.methods}
    need = max(cfg.segments * cfg.seg_len, max(cfg.speed_contexts) + cfg.decode_steps + 1)
    evaluated = max(cfg.segments * cfg.seg_len if "quality" in cfg.sections else 0,
                    need + 64 if "speed" in cfg.sections else 0)  # speed prompts: the first need + 64 tokens
    evaluating(cfg.corpus, evaluated)  # a calibration made now refuses these tokens
    try:
        models = {n: prepare(model, m, tok, cfg.corpus) for n, m in methods.items()}  # ZDC: a transformed copy
    finally:
        evaluating(cfg.corpus, 0)
    makers = {n: (lambda m=m, n=n: from_method(m, models[n])) for n, m in methods.items()}
    caches, shares = {}, {}
    for n, make in makers.items():  # refuse bad method options now, not after an hour of other methods
        cache = make()
        caches[n] = cache.describe() if hasattr(cache, "describe") else type(cache).__name__  # peers: theirs
        if getattr(cache, "layer_shares", None) is not None:  # importance-aware caches: their high class per layer
            shares[n] = cache.layer_shares
        if methods[n].config.calibrated:
            log(f"{n}: {caches[n]}")
    # the reference as transformers builds it for this model: sliding layers keep their window
    with_ref = {REF: lambda: DynamicCache(config=model.config), **makers}
    ids = load_corpus_ids(tok, cfg.corpus, need + 64).to(device)
    res: dict = {
        "model": cfg.model or "SmolLM2-135M-Instruct (bundled, Q4_1 GGUF dequantized to float32)",
        "spec": asdict(spec),
        "config": asdict(cfg),
        "methods": {n: {"description": m.description, "family": m.family, "cache": caches[n],
                        **({"layer_shares": shares[n]} if n in shares else {})} for n, m in methods.items()},
        "machine": _machine(device),
    }
    with _progress() as bar:
        # speed first: nothing else in the run has touched the allocator yet
        if "speed" in cfg.sections:
            task = bar.add_task("speed + memory", total=len(cfg.speed_contexts) * len(with_ref))
            res["speed"] = measure_speed(model, spec, with_ref, ids[None, :need], cfg.speed_contexts,
                                         cfg.decode_steps, lambda: bar.advance(task), models)
            res["direct_prefill_tok_s"] = {
                "tokens": cfg.direct_prefill,
                "by_method": measure_direct_prefill(model, with_ref, ids[None, :], cfg.direct_prefill, models),
            }
            _checkpoint(res, cfg.out, t_start)
        if "quality" in cfg.sections:
            segs = segments(ids, cfg.seg_len, cfg.segments)
            steps = cfg.segments * -(-cfg.seg_len // cfg.chunk)
            task = bar.add_task("perplexity + agreement", total=steps)
            res["quality"] = evaluate_quality(model, spec, makers, segs, cfg.chunk, lambda: bar.advance(task), models)
            res["quality_protocol"] = {"segments": cfg.segments, "segment_tokens": cfg.seg_len, "chunk": cfg.chunk,
                                       "predicted_tokens": res["quality"][REF]["tokens"],
                                       "corpus": os.path.basename(cfg.corpus or default_corpus())}
            _checkpoint(res, cfg.out, t_start)
        if "needle" in cfg.sections:
            n = len(cfg.needle_lengths) * len(cfg.needle_depths) * 2 * len(with_ref)
            task = bar.add_task("needle in a haystack", total=n)
            peers = tuple(n for n, m in methods.items() if m.family == "peer")
            res["needle"] = run_needles(model, tok, with_ref, cfg.needle_lengths, cfg.needle_depths,
                                        max_context=spec.max_context, progress=lambda: bar.advance(task),
                                        tolerate=peers, models=models)
    if "serve" in cfg.sections or "sp" in cfg.sections:
        _checkpoint(res, cfg.out, t_start)
        return _serve(res, cfg, model, tok, t_start, log)
    res["elapsed_s"] = time.time() - t_start
    write_outputs(res, cfg.out)
    return res


def _machine(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def _serve(res: dict, cfg: BenchConfig, model, tok, t_start: float, log) -> dict:
    """The sections that run whole workloads (serve, sp), then the outputs."""
    ids = load_corpus_ids(tok, cfg.corpus, 100_000)
    with _progress() as bar:
        if "serve" in cfg.sections:
            task = bar.add_task("serve load", total=len(cfg.serve_methods) * len(cfg.serve_rates))
            res["serve"] = serve_section(model, tok, cfg.serve_methods, ids, parse_bytes(cfg.serve_budget),
                                         cfg.serve_rates, Workload(requests=cfg.serve_requests),
                                         cfg.serve_time_limit, progress=lambda: bar.advance(task), log=log)
            _checkpoint(res, cfg.out, t_start)
        if "sp" in cfg.sections:
            task = bar.add_task("sequence parallel", total=len(cfg.sp_methods) * len(cfg.sp_contexts)
                                * len(cfg.sp_ranks) * len(cfg.sp_wires) * len(cfg.sp_exchanges))
            res["sp"] = sp_section(model, tok, cfg.sp_methods, ids, cfg.sp_contexts, cfg.sp_ranks,
                                   cfg.sp_new_tokens, progress=lambda: bar.advance(task), source=cfg.model,
                                   wires=cfg.sp_wires, exchanges=cfg.sp_exchanges)
    res["elapsed_s"] = time.time() - t_start
    write_outputs(res, cfg.out)
    return res


def _checkpoint(res: dict, out: str, t_start: float) -> None:
    """Write what is measured so far, so a long run that dies keeps its sections."""
    res["elapsed_s"] = time.time() - t_start
    write_outputs(res, out)


def _fmt(x, spec=".2f", none="–"):
    return none if x is None else format(x, spec)


def table(res: dict) -> str:
    names = [REF, *res["methods"]]
    q, nd, sp = res.get("quality", {}), res.get("needle", {}), res.get("speed", {})
    ctxs = sorted({int(c) for m in sp.values() for c in m}) if sp else []
    lengths = res["config"]["needle_lengths"]
    head = ["method", "ratio vs fp16", "ppl", "Δppl", "KL", "top-1"]
    head += [f"needle {round(l / 1024)}k" for l in lengths] if nd else []
    head += [f"decode ×dyn @{round(c / 1024)}k" for c in ctxs]
    mem = "RSS" if res.get("machine", {}).get("device", "cpu") == "cpu" else "CUDA"  # whose memory was read
    head += [f"ratio @{round(ctxs[-1] / 1024)}k", f"{mem} held MB @{round(ctxs[-1] / 1024)}k",
             f"peak MB @{round(ctxs[-1] / 1024)}k"] if ctxs else []
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r = q.get(n, {})
        row = [f"`{n}`", _fmt(r.get("ratio"), ".2f", "0.50 (fp32)" if n == REF else "–"), _fmt(r.get("ppl"), ".3f"),
               _fmt(100 * r["ppl_change"] if "ppl_change" in r else None, "+.2f") + ("%" if r else ""),
               _fmt(r.get("kl"), ".4f"), _fmt(r.get("top1"), ".3f")]
        if nd:
            errs = nd[n].get("errors", 0)
            row += [_fmt(nd[n].get(f"score_{l}"), ".2f") for l in lengths]
            if errs:
                row[-1] += f" ({errs} cases failed: see results.json)"
        for c in ctxs:
            s, ref = sp[n].get(c) or sp[n].get(str(c)), sp[REF].get(c) or sp[REF].get(str(c))
            row.append(f"{s['decode_tok_s'] / ref['decode_tok_s']:.2f} ({s['decode_tok_s']:.1f}/s)")
        if ctxs:
            s = sp[n].get(ctxs[-1]) or sp[n].get(str(ctxs[-1]))
            row += [f"{s['ratio']:.2f}", f"{s['rss_held_mb']:.0f}", f"{s['peak_extra_mb']:.0f}"]
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def prefill_table(res: dict) -> str:
    sp = res.get("speed")
    if not sp:
        return ""
    ctxs = sorted({int(c) for m in sp.values() for c in m})
    n_direct = res["direct_prefill_tok_s"]["tokens"]
    rows = ["| method | " + " | ".join(f"prefill tok/s @{round(c / 1024)}k (×dyn)" for c in ctxs)
            + f" | direct prefill tok/s @{n_direct} | peak MB @{n_direct} | cache MB after |",
            "|" + "---|" * (len(ctxs) + 4)]
    direct = {n: d if isinstance(d, dict) else {"tok_s": d} for n, d in res["direct_prefill_tok_s"]["by_method"].items()}
    for n, by in sp.items():
        cells = []
        for c in ctxs:
            s, ref = by.get(c) or by.get(str(c)), sp[REF].get(c) or sp[REF].get(str(c))
            cells.append(f"{s['prefill_tok_s']:.0f} ({s['prefill_tok_s'] / ref['prefill_tok_s']:.3f})")
        d = direct[n]
        rows.append(f"| `{n}` | " + " | ".join(cells) + f" | {d['tok_s']:.0f} | {_fmt(d.get('peak_extra_mb'), '.0f')} | "
                    f"{_fmt(d['cache_bytes'] / 2**20 if 'cache_bytes' in d else None, '.1f')} |")
    evict = [(n, by) for n, by in sp.items() if any("bytes_before_eviction" in v for v in by.values())]
    if evict:
        rows += ["", "| method | " + " | ".join(f"MB before → after eviction @{round(c / 1024)}k (fp16 of the same tokens)"
                                              for c in ctxs) + " |", "|" + "---|" * (len(ctxs) + 1)]
        for n, by in evict:
            cells = []
            for c in ctxs:
                s = by.get(c) or by.get(str(c))
                fp16 = s["cache_bytes"] * s["ratio"]
                cells.append(f"{s['bytes_before_eviction'] / 2**20:.1f} → {s['bytes_after_eviction'] / 2**20:.1f} "
                             f"({fp16 / 2**20:.1f})")
            rows.append(f"| `{n}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def roofline_table(res: dict) -> str:
    """Per context: decode ×dyn, p50/p99 step latency (the median step against DynamicCache's too: its slowest steps,
    which copy the whole cache, weigh on its steps per second), the bytes a step must read (weights + the cache
    as held), the bandwidth that attains and its fraction of the read bandwidth measured in the run."""
    sp = res.get("speed")
    if not sp:
        return ""
    ctxs = sorted({int(c) for m in sp.values() for c in m})
    first = next(iter(sp[REF].values()))
    if "bytes_per_step" not in first:
        return ""
    out = [f"Decode steps timed round-robin over the methods (one step of each per round), so the machine's "
           "drift falls on all alike.", ""]
    out += [f"Roofline (read bandwidth measured in this run: {first['read_bandwidth_gb_s']:.1f} GB/s; a step reads "
           "at least the weights and the cache as held):", "",
           "| method | context | decode tok/s (×dyn) | p50 / p99 / max ms (p50 ×dyn) | MB read per step | "
           "GB/s attained | fraction of bandwidth | bandwidth-bound tok/s |", "|---|---|---|---|---|---|---|---|"]
    for c in ctxs:
        ref = sp[REF].get(c) or sp[REF].get(str(c))
        for n, by in sp.items():
            r = by.get(c) or by.get(str(c))
            out.append(f"| `{n}` | {c} | {r['decode_tok_s']:.1f} ({r['decode_tok_s'] / ref['decode_tok_s']:.2f}) | "
                       f"{r['decode_p50_ms']:.0f} / {r['decode_p99_ms']:.0f} / {_fmt(r.get('decode_max_ms'), '.0f')} "
                       f"({ref['decode_p50_ms'] / r['decode_p50_ms']:.2f}) | "
                       f"{r['bytes_per_step'] / 1e6:.0f} | "
                       f"{r['attained_gb_s']:.2f} | {r['bandwidth_fraction']:.2f} | {r['bandwidth_bound_tok_s']:.1f} |")
    return "\n".join(out)


def coding_table(res: dict) -> str:
    """Entropy-coded caches: bits per symbol of their codes against the Shannon entropy of the same symbols."""
    rows = [(n, r["coding"]) for n, r in res.get("quality", {}).items() if r.get("coding")]
    if not rows:
        return ""
    out = ["| method | key bits/symbol | key entropy | value bits/symbol | value entropy | over the limit |",
           "|---|---|---|---|---|---|"]
    for n, c in rows:
        k, v = c.get("keys", {}), c.get("values", {})
        bits = k.get("bits_per_symbol", 0) * k.get("symbols", 0) + v.get("bits_per_symbol", 0) * v.get("symbols", 0)
        ent = (k.get("entropy_bits_per_symbol", 0) * k.get("symbols", 0)
               + v.get("entropy_bits_per_symbol", 0) * v.get("symbols", 0))
        out.append(f"| `{n}` | {_fmt(k.get('bits_per_symbol'), '.3f')} | {_fmt(k.get('entropy_bits_per_symbol'), '.3f')} "
                   f"| {_fmt(v.get('bits_per_symbol'), '.3f')} | {_fmt(v.get('entropy_bits_per_symbol'), '.3f')} "
                   f"| {100 * (bits / ent - 1):+.1f}% |")
    return "\n".join(out)


def write_outputs(res: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1, default=str)
    qp = res.get("quality_protocol", {})
    md = [f"# kvshrink bench: {res['model']}", ""]
    if qp:
        md.append(f"Perplexity on {qp.get('corpus', 'WikiText-2 test')}: {qp['segments']} segments × "
                  f"{qp['segment_tokens']} tokens, "
                  f"chunks of {qp['chunk']}, {qp['predicted_tokens']} predicted tokens per method. "
                  "Ratio = fp16 bytes / bytes held, at the end of each segment. "
                  "Decode ×dyn = tokens/s relative to DynamicCache (float32) in this run. "
                  "RSS held = process memory growth once the filled cache is held; peak = growth while "
                  "filling and decoding (see kvshrink/eval/speed.py).")
    if any(k in res for k in ("quality", "speed", "needle")):
        md += ["", table(res), "", prefill_table(res), "", roofline_table(res), "", coding_table(res)]
    if "serve" in res:
        md += ["", "## Serving", "", serve_table(res["serve"])]
        serve_plot(res["serve"], os.path.join(out, "serve.png"))
    if "sp" in res:
        md += ["", "## Sequence parallel (docs/sp.md)", "", sp_table(res["sp"])]
        sp_plot(res["sp"], os.path.join(out, "sp.png"))
    md += ["", f"Elapsed: {res['elapsed_s']:.0f} s", ""]
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write("\n".join(md))
    if "quality" in res:
        plot(res, os.path.join(out, "ratio_vs_ppl.png"))
    if any("layer_shares" in m for m in res.get("methods", {}).values()):
        share_plot(res, os.path.join(out, "layer_shares.png"))


def share_plot(res: dict, path: str) -> None:
    """Importance-aware caches (families/mixed): the share of each layer's coded tokens kept in the high class."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, m in res["methods"].items():
        if "layer_shares" in m:
            ax.plot(range(len(m["layer_shares"])), [100 * s for s in m["layer_shares"]], marker="o", label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("tokens in the high class (%)")
    ax.set_title("Share of important tokens per layer (FDC: more in deeper layers)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(res: dict, path: str) -> None:
    """The frontier: ratio against perplexity change and against KL, one point per method."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    # a perplexity change can be negative: symmetric log, linear within +-0.1%; KL on a log axis
    panels = ((axes[0], "ppl_change", "perplexity change vs uncompressed (%)", {"value": "symlog", "linthresh": 0.1}),
              (axes[1], "kl", "KL(uncompressed || method) per token", {"value": "log"}))
    for ax, key, label, yscale in panels:
        points = [(name, r["ratio"], 100 * r[key] if key == "ppl_change" else max(r[key], 1e-6))
                  for name, r in res["quality"].items() if "ratio" in r]
        for i, (name, x, y) in enumerate(points):
            peer = res["methods"][name]["family"] == "peer"
            ax.scatter(x, y, marker="s" if peer else "o", color="tab:gray" if peer else "tab:blue")
            # methods of one ratio (variants of a preset) alternate sides in the order of their y, so
            # close points' labels do not overlap
            same = sorted((q for q in points if round(q[1], 2) == round(x, 2)), key=lambda q: q[2])
            if len(same) > 1:
                left = same.index((name, x, y)) % 2
                ax.annotate(name, (x, y), fontsize=7, xytext=(-6 if left else 6, -3), textcoords="offset points",
                            ha="right" if left else "left")
            else:
                ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4 if i % 2 else -10), textcoords="offset points")
        ax.set_yscale(**yscale)
        ax.set_xlabel("compression ratio vs fp16 (bytes really held)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"kvshrink on {res.get('quality_protocol', {}).get('corpus', 'WikiText-2 test')}: ratio against "
                 "quality (squares: transformers QuantizedCache)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
