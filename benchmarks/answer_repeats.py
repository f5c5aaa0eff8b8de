"""How often the edited model repeats its answer once written ("Spanish Civil War? Spanish Civil War?"): edit T
held-out requests with the benchmark's settings (plus ``--settings``), generate 20 greedy tokens after every edit
prompt and rephrase, and count the continuations that start with the target and then, after punctuation or space,
start again with its first or last word.

    python -m benchmarks.answer_repeats --dataset zsre counterfact --T 100
    python -m benchmarks.answer_repeats --settings '{"answer_continuation": 2}'
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

from lemoe_peft.edit_log import write_json_atomic
from lemoe_peft.generation import answers_with, greedy_continuations, normalize

from .data import CACHE
from .methods import SETTINGS, held_out_lemoe

TOKENS = 20


def repeats(continuation: str, target: str) -> bool:
    """Whether ``continuation`` answers with ``target`` (the generated metric's rule) and then begins it again (its
    first or last word, in any case)."""
    if not answers_with(continuation, target):
        return False
    text, target = normalize(continuation).lower(), normalize(target).lower()
    words = target.split()
    rest = re.sub(r"^[\W_]+", "", text[len(target) :])
    return any(re.match(re.escape(word) + r"\b", rest) for word in (words[0], words[-1]))


def repeat_rate(model, tokenizer, pairs: Sequence[tuple[str, str]]) -> float:
    """Share of (prompt, target) pairs whose greedy continuation repeats the target."""
    continuations = greedy_continuations(model, tokenizer, [p for p, _ in pairs], [TOKENS] * len(pairs))
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in continuations]
    return sum(repeats(text, target) for text, (_, target) in zip(texts, pairs, strict=True)) / len(pairs)


def measure(dataset: str, T: int, settings: dict, cache: Path) -> dict:
    method, tokenizer, requests, _ = held_out_lemoe(dataset, T, {**SETTINGS, **settings}, cache)
    edits = [(r.prompt, r.target_new) for r in requests]
    rephrases = [(p, r.target_new) for r in requests for p in r.rephrase_prompts]
    return {
        "dataset": dataset,
        "T": len(requests),
        "settings": settings,
        "edit_prompts_repeated": round(repeat_rate(method.model, tokenizer, edits), 3),
        "rephrases_repeated": round(repeat_rate(method.model, tokenizer, rephrases), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["zsre", "counterfact"])
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--settings", type=json.loads, default={}, help="editor/config settings over the benchmark's")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "answer_repeats.json")
    args = parser.parse_args()
    rows = [measure(dataset, args.T, args.settings, args.cache) for dataset in args.dataset]
    write_json_atomic(args.out, rows)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
