"""RULER-style needle in a haystack with a compressed cache.

Haystack kinds: "noise" (repeated filler sentences, one needle) and
"distractor" (filler plus needles for other keys). Needles read "One of the
special magic numbers for {key} is: {7 digits}."; the score is exact match of
the 7 digits in the greedy answer.

As in kvpress, the context is prefilled first and the question is then fed
through the compressed cache. The context prefill is shared between methods:
a compressed cache's first `update` stores the states and returns them as
given, so filling each method's cache from one reference prefill's states
gives exactly the cache a prefill through it would (tested).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..compat import with_cache
from ..attention.function import capturing_queries
from ..errors import KvshrinkError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
WORDS = (
    "apple river stone cloud maple falcon copper violet harbor meadow lantern ember glacier orchid "
    "thunder willow saffron quartz canyon marble comet juniper beacon tundra"
).split()
KINDS = ("noise", "distractor")
ANSWER_TOKENS = 12


@dataclass
class NeedleCase:
    kind: str
    length: int
    depth: float
    context: torch.Tensor  # (1, n) ids: chat prefix + haystack
    question: torch.Tensor  # (1, m) ids: question, end of turn, answer prefix
    answer: str


def _needle(key: str, number: str) -> str:
    return f"One of the special magic numbers for {key} is: {number}."


def make_case(tokenizer, length: int, depth: float, kind: str, seed: int = 0) -> NeedleCase:
    """A haystack of about `length` tokens in all, the needle at `depth` (0 = start, 1 = end). A length
    that leaves no room for one sentence of haystack around the needles and the question is refused."""
    if not 0.0 <= depth <= 1.0:
        raise KvshrinkError(f"a needle depth is a fraction of the haystack, 0 to 1; got {depth}")
    rng = random.Random(f"{seed}-{length}-{depth}-{kind}")
    keys = rng.sample(WORDS, 4)
    numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix_msg = "Some special magic numbers are hidden within the following text. Make sure to memorize them.\n"
    content = prefix_msg + "HAYSTACK\n" + question
    try:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    except ValueError:  # a base model without a chat template (Gemma 3 270M): the same text as a plain prompt
        chat = (getattr(tokenizer, "bos_token", None) or "") + content + "\n"
    head, tail = chat.split("HAYSTACK")
    tail += f"The special magic number for {keys[0]} mentioned in the provided text is"
    n_fixed = len(tokenizer(head + tail, add_special_tokens=False).input_ids) + 40
    needles = keys if kind == "distractor" else keys[:1]  # every needle takes room from the noise
    n_fixed += sum(len(tokenizer(" " + _needle(k, n), add_special_tokens=False).input_ids)
                   for k, n in zip(needles, numbers))
    per = len(tokenizer(" " + NOISE, add_special_tokens=False).input_ids)
    n_fixed += ANSWER_TOKENS
    if length - n_fixed < per:
        raise KvshrinkError(f"a {kind} needle case of {length} tokens leaves no room for a haystack: the question, "
                            f"needles and answer take {n_fixed}; use at least {n_fixed + per}")
    sentences = [NOISE] * ((length - n_fixed) // per)
    sentences.insert(round(depth * len(sentences)), _needle(keys[0], numbers[0]))
    if kind == "distractor":
        for key, num in zip(keys[1:], numbers[1:]):
            sentences.insert(rng.randint(0, len(sentences)), _needle(key, num))
    context = tokenizer(head + " ".join(sentences) + "\n", return_tensors="pt", add_special_tokens=False).input_ids
    q = tokenizer(tail, return_tensors="pt", add_special_tokens=False).input_ids
    return NeedleCase(kind, length, depth, context, q, numbers[0])


def fill(cache, states) -> None:
    """Store prefill states [(k, v) per layer] in `cache`, as a prefill through it would.
    A cache whose model was transformed (ZDC) converts the states itself (`fill_reference`)."""
    if hasattr(cache, "fill_reference"):
        cache.fill_reference(states)
        return
    for i, (k, v) in enumerate(states):
        cache.update(k, v, i)


class PrefillStates(list):
    """[(keys, values) per layer] of an uncompressed prefill, with each layer's last queries
    (`queries`, post-RoPE): eviction caches score their observation window from them."""

    queries: list


@torch.no_grad()
def prefill_states(model, ids: torch.Tensor) -> PrefillStates:
    ref = DynamicCache()
    with capturing_queries(model) as captured:
        model(ids, **with_cache(model, ref), use_cache=True, logits_to_keep=1)
    states = PrefillStates((layer.keys, layer.values) for layer in ref.layers)
    states.queries = [captured[i] for i in range(len(states))]
    return states


@torch.no_grad()
def greedy(model, cache, ids: torch.Tensor, max_new: int, eos: int | None) -> list[int]:
    out, x = [], ids
    for _ in range(max_new):
        logits = model(x, **with_cache(model, cache), use_cache=True, logits_to_keep=1).logits[0, -1]
        tok = int(logits.argmax())
        if tok == eos:
            break
        out.append(tok)
        x = torch.tensor([[tok]], device=ids.device)
    return out


def run_needles(model, tokenizer, make_cache: dict, lengths, depths, kinds=KINDS, max_context=None, progress=None,
                tolerate=(), models: dict | None = None):
    """{method: {"score": mean, "cases": [...]}}; make_cache includes the uncompressed reference.

    Methods named in `tolerate` (other libraries) may fail on a case: the failure is recorded as
    that case's "error" and counted in "errors", never scored as a hit; any other failure raises.
    """
    models = models or {}
    results = {name: {"cases": []} for name in make_cache}
    for length in lengths:
        for kind in kinds:
            for depth in depths:
                case = make_case(tokenizer, length, depth, kind)
                total = case.context.shape[1] + case.question.shape[1] + ANSWER_TOKENS
                if max_context and total > max_context:
                    raise KvshrinkError(f"needle case of {total} tokens exceeds the model's {max_context}")
                case.context, case.question = case.context.to(model.device), case.question.to(model.device)
                states = prefill_states(model, case.context)
                for name, factory in make_cache.items():
                    row = {"kind": kind, "length": length, "depth": depth, "tokens": total}
                    try:
                        cache = factory()
                        fill(cache, states)
                        out = greedy(models.get(name, model), cache, case.question, ANSWER_TOKENS, tokenizer.eos_token_id)
                        text = tokenizer.decode(out)
                        row.update(hit=case.answer in text, output=text.strip())
                    except Exception as err:  # noqa: BLE001 - only for the tolerated peers
                        if name not in tolerate:
                            raise
                        row.update(hit=False, error=f"{type(err).__name__}: {str(err).splitlines()[0]}")
                    results[name]["cases"].append(row)
                    if progress is not None:
                        progress()
                del states
    for r in results.values():
        cases = r["cases"]
        r["errors"] = sum("error" in c for c in cases)
        r["score"] = sum(c["hit"] for c in cases) / len(cases)
        for length in lengths:
            sub = [c["hit"] for c in cases if c["length"] == length]
            r[f"score_{length}"] = sum(sub) / len(sub)
        for kind in kinds:
            sub = [c["hit"] for c in cases if c["kind"] == kind]
            r[f"score_{kind}"] = sum(sub) / len(sub)
    return results
