"""What CounterFact's rephrase prompts ask, and LEMoE's generality on each kind.

The EasyEdit-schema CounterFact files give one ``rephrase_prompt`` per edit, of two kinds: ROME's *paraphrase*
prompts, a sentence of unrelated text followed by the edit's relation in other words ("It is found in Palestine. M5
motorway can be found in"), and prompts without that prefix, most of them ROME-style *generation* prompts that talk
around the fact rather than ask for it ("One can get to Valdemarsvik by navigating", "When Pinhas Hirschprung was
killed, the locals held a"), whose exact-match answer is often not the edited object at all. This splits a lifelong
result's per-case rephrase scores by kind (a prefix sentence before the subject, or none).

    python -m benchmarks.counterfact_rephrases bench-results/full/counterfact/lemoe-T1000.json ...
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path

from lemoe_peft import EditRequest
from lemoe_peft.edit_log import write_json_atomic

from .data import requests_for

PARAPHRASE, OTHER = "prefixed paraphrase", "no prefix"
SENTENCE_END = re.compile(r"[.!?)\]:;]\s|\n")


def rephrase_kind(prompt: str, subject: str) -> str:
    """PARAPHRASE when a sentence ends (or a line breaks) before the subject, else OTHER."""
    start = prompt.find(subject)
    return PARAPHRASE if start > 0 and SENTENCE_END.search(prompt[:start] + " ") else OTHER


def split_by_kind(cases: Sequence[dict], requests: Sequence[EditRequest]) -> dict[str, dict[str, float]]:
    """Per kind: how many edits, and their mean generated and teacher-forced rephrase scores (CounterFact has one
    rephrase per edit, so a case's score is its rephrase's)."""
    groups: dict[str, list[dict]] = {PARAPHRASE: [], OTHER: []}
    for case, request in zip(cases, requests, strict=True):
        if case["prompt"] != request.prompt:
            raise ValueError(f"Cases and requests are not aligned: {case['prompt']!r} vs {request.prompt!r}.")
        if len(request.rephrase_prompts) != 1:
            raise ValueError(f"Expected one rephrase per edit: {request.prompt!r} has {len(request.rephrase_prompts)}.")
        groups[rephrase_kind(request.rephrase_prompts[0], request.subject)].append(case)
    return {
        kind: {
            "edits": len(rows),
            "rephrase_gen_acc": round(sum(c["rephrase_gen_acc"] for c in rows) / len(rows), 3),
            "rephrase_acc": round(sum(c["rephrase_acc"] for c in rows) / len(rows), 3),
        }
        for kind, rows in groups.items()
        if rows
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks.lifelong result files (CounterFact)")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "counterfact_rephrases.json")
    args = parser.parse_args()
    rows = {}
    for path in args.results:
        result = json.loads(path.read_text(encoding="utf-8"))
        requests = requests_for("counterfact", result["protocol"]["T"])
        rows[f"{result['protocol']['method']} T={len(requests)}"] = split_by_kind(result["cases"], requests)
    write_json_atomic(args.out, rows)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
