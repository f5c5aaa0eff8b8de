"""Where generated rephrases are lost: edit T held-out requests with LEMoE's defaults (the benchmark's settings),
then sort every rephrased prompt by where routing sends its last token (the position at which greedy generation
picks the answer's first token: its own edit's expert, another expert, or none) and by whether ``generate()`` answers
with the edit (the generated-generality metric's rule).

    python -m benchmarks.rephrase_outcomes --dataset zsre counterfact --T 100
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from lemoe_peft.edit_log import write_json_atomic
from lemoe_peft.evaluation import generated_answer_hits
from lemoe_peft.inspection import which_expert

from .data import CACHE
from .methods import SETTINGS, held_out_lemoe


def outcomes(dataset: str, T: int, cache: Path) -> dict:
    method, tokenizer, requests, experts = held_out_lemoe(dataset, T, SETTINGS, cache)
    pairs = [(p, r.target_new) for r in requests for p in r.rephrase_prompts]
    owners = [e for r, e in zip(requests, experts, strict=True) for _ in r.rephrase_prompts]
    routed = [
        next(iter(which_expert(method.model, tokenizer, prompt.rstrip())["layers"].values()))["expert"]
        for prompt, _ in pairs
    ]
    hits = generated_answer_hits(method.model, tokenizer, pairs)
    counts = Counter(
        ("own expert" if e == o else "no expert" if e is None else "another expert", "answers" if hit else "misses")
        for e, o, hit in zip(routed, owners, hits, strict=True)
    )
    return {
        "dataset": dataset,
        "T": len(requests),
        "rephrases": len(pairs),
        "shares": {f"{where}, {outcome}": round(n / len(pairs), 3) for (where, outcome), n in sorted(counts.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["zsre", "counterfact"])
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "rephrase_outcomes.json")
    args = parser.parse_args()
    rows = [outcomes(dataset, args.T, args.cache) for dataset in args.dataset]
    write_json_atomic(args.out, rows)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
