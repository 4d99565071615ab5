"""The bench's `sp` section: sequence-parallel prefill and head-sharded decode against one process.

Per method, prompt length and process count: the bytes each rank sends per layer in the prefill's
all-to-alls (keys, values, queries, outputs), the time in collectives against the whole prefill,
the decode time per token, the bytes each rank's cache holds, and how the outputs agree with a
single process running the same method: the last prompt token's logits against one call over the
whole prompt, and against the prompt fed in chunks of 64 through the cache (what a compressed
exchange should be compared with: there too the prompt's earlier tokens are read coded), the same
two for the prompt's own perplexity (each rank scores the tokens its slice predicts), and the
greedy tokens. `wires` adds runs whose prefill messages are int-coded (wire.py).
Every process count runs on this machine's cores, so the times show the protocol's overhead, not a
speed-up (docs/sp.md).
"""

from __future__ import annotations

import time

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..api import from_method, prepare  # noqa: E402
from ..compat import with_cache  # noqa: E402
from ..core.cache import cache_nbytes  # noqa: E402
from .launch import launch  # noqa: E402
from .sp import check, next_token_nll, run_rank  # noqa: E402

SP_METHODS = ("fp16", "zdc-adaptive-50", "zdc-adaptive-50+int4")
KINDS = ("k", "v", "q", "o", "sink")  # sink: a narrowed exchange shares the sink tokens from rank 0
CHUNK = 64  # the quality protocol's chunk (docs/protocol.md)


def _single(model, tok, method: str, ids: torch.Tensor, new_tokens: int) -> dict:
    m = prepare(model, method, tok)
    cache = from_method(method, m)
    targets = ids[0, 1:]
    with torch.no_grad():
        t0 = time.perf_counter()
        out = m(ids, use_cache=True, **with_cache(m, cache))  # every logit, as the ranks score the prompt too
        prefill = time.perf_counter() - t0
        logits, tokens = out.logits[0, -1], [int(out.logits[0, -1].argmax())]
        nll = torch.cat([next_token_nll(out.logits[0, i:i + 1024], targets[i:i + 1024])
                         for i in range(0, targets.numel(), 1024)])
        del out
        chunked = from_method(method, m)  # the cache's own view of the prompt: each chunk reads the earlier ones coded
        chunk_nll = []
        for i in range(0, ids.shape[1], CHUNK):
            part = m(ids[:, i:i + CHUNK], use_cache=True, **with_cache(m, chunked)).logits[0]
            chunk_nll.append(next_token_nll(part, targets[i:i + CHUNK]))
        last = part[-1]
        t0 = time.perf_counter()
        for i in range(new_tokens - 1):
            step = m(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, logits_to_keep=1, **with_cache(m, cache))
            tokens.append(int(step.logits[0, -1].argmax()))
        decode = time.perf_counter() - t0
    return {"logits": logits, "chunked_logits": last, "tokens": tokens, "prefill_s": prefill, "decode_s": decode,
            "held": cache_nbytes(cache), "ppl": float(nll.mean().exp()),
            "chunked_ppl": float(torch.cat(chunk_nll).mean().exp())}


def _kl(a: torch.Tensor, b: torch.Tensor) -> float:
    """KL(softmax(a) || softmax(b)) in nats."""
    p, q = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
    return float((p.exp() * (p - q)).sum())


def sp_section(model, tok, methods, ids: torch.Tensor, contexts, ranks, new_tokens: int = 8, progress=None,
               source=None, wires=("model",), exchanges=("reduced",)) -> list[dict]:
    rows = []
    for method in methods:
        for n in contexts:
            prompt = ids[None, :n]
            one = _single(model, tok, method, prompt, new_tokens)
            for world, wire, exchange in ((w, x, e) for w in ranks for x in wires for e in exchanges):
                check(model, tok, method, n, new_tokens, world, wire, exchange)
                res = launch(run_rank, world, (source, method, prompt, new_tokens, False, wire, True, exchange),
                             timeout=1800)
                ppl = float(torch.cat([r["nll"] for r in res]).mean().exp())
                layers = res[0]["layers"]
                last = res[-1]["logits"][-1]
                agree = next((i for i, (a, b) in enumerate(zip(res[0]["tokens"], one["tokens"])) if a != b),
                             new_tokens)
                rows.append({
                    "method": method, "tokens": n, "ranks": world, "wire": wire, "exchange": exchange,
                    "layers": layers,
                    "sent_per_layer": {k: sum(r["sent"].get(k, 0) for r in res) / world / layers for k in KINDS},
                    "prefill_s": max(r["prefill_s"] for r in res),
                    "prefill_comm_s": max(r["prefill_comm_s"] for r in res),
                    "decode_ms_per_token": 1000 * max(r["decode_s"] for r in res) / max(new_tokens - 1, 1),
                    "decode_comm_ms_per_token": 1000 * max(r["decode_comm_s"] for r in res) / max(new_tokens - 1, 1),
                    "held_per_rank": [r["held"] for r in res],
                    "single": {"prefill_s": one["prefill_s"], "held": one["held"],
                               "decode_ms_per_token": 1000 * one["decode_s"] / max(new_tokens - 1, 1)},
                    "last_token_kl": _kl(one["logits"], last),
                    "last_token_kl_chunked": _kl(one["chunked_logits"], last),
                    "last_token_max_abs": float((one["logits"] - last).abs().max()),
                    "greedy_equal": agree, "new_tokens": new_tokens,
                    "prompt_ppl": ppl, "single_ppl": one["ppl"], "chunked_ppl": one["chunked_ppl"],
                })
                if progress:
                    progress()
    return rows


def _delta(ppl: float | None, ref: float) -> str:
    return f"{100 * (ppl / ref - 1):+.2f}%" if ppl is not None else "–"


def sp_table(rows: list[dict]) -> str:
    base = {(r["tokens"], r["ranks"]): r for r in rows if r["method"] == "fp16" and r.get("wire", "model") == "model"
            and r.get("exchange", "reduced") == "reduced"}
    out = ["| method | wire (exchange) | prompt | ranks | KiB sent / rank / layer (k, v, q, o, sink) "
           "| MiB / rank / prompt | ×fp16 | prefill s (collectives) "
           "| one process s | decode ms/token (collectives) | one process | KiB held / rank (one process) "
           "| prompt Δppl: one call (chunks of 64) | last-token KL: one call (chunks of 64) | greedy tokens equal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sent_per_layer"]
        total = sum(s.values())
        ref = base.get((r["tokens"], r["ranks"]))
        ratio = f"{total / sum(ref['sent_per_layer'].values()):.2f}" if ref else "–"
        ppl = r.get("prompt_ppl")
        quality = (f"{_delta(ppl, r['single_ppl'])} ({_delta(ppl, r['chunked_ppl'])})" if ppl is not None else "–")
        wire = r.get("wire", "model") + ("" if r.get("exchange", "reduced") == "reduced" else ", " + r["exchange"])
        out.append(
            f"| `{r['method']}` | {wire} | {r['tokens']} | {r['ranks']} | {total / 1024:.1f} ("
            + ", ".join(f"{s[k] / 1024:.1f}" for k in KINDS) + f") | {total * r['layers'] / 2 ** 20:.1f} "
            f"| {ratio} | {r['prefill_s']:.1f} "
            f"({r['prefill_comm_s']:.1f}) | {r['single']['prefill_s']:.1f} | {r['decode_ms_per_token']:.0f} "
            f"({r['decode_comm_ms_per_token']:.0f}) | {r['single']['decode_ms_per_token']:.0f} "
            f"| {max(r['held_per_rank']) / 1024:.0f} "
            f"({r['single']['held'] / 1024:.0f}) | {quality} "
            f"| {r['last_token_kl']:.2g} ({r['last_token_kl_chunked']:.2g}) "
            f"| {r['greedy_equal']}/{r['new_tokens']} |")
    return "\n".join(out)


def sp_plot(rows: list[dict], path: str) -> None:
    """Bytes each rank sends per layer, stacked by kind, one bar per (method, prompt, ranks)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4.5))
    labels = [f"{r['method']}{'' if r.get('wire', 'model') == 'model' else ' ' + r['wire'] + ' wire'}\n"
              f"{r['tokens']} tok, {r['ranks']} ranks" for r in rows]
    bottom = [0.0] * len(rows)
    for k in KINDS:
        vals = [r["sent_per_layer"][k] / 1024 for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("KiB sent per rank per layer (prefill)")
    ax.legend(title="kind")
    ax.set_title("sequence-parallel prefill: all-to-all bytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
