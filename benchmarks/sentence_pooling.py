"""Does the routing query read only the last sentence? A routing-only measurement on held-out data.

A sixth of CounterFact's rephrases put an unrelated sentence before the question ("It is found in Palestine. M5
motorway can be found in"); in a running mean over the whole prompt that sentence outweighs the question, and most
of these reach no expert. ``route_restart="sentence"`` (the default) restarts the mean where a sentence begins
(after a token ending in "." or "!" that whitespace follows); ``"off"`` pools the whole prompt. Edits, rephrases and
negatives are those of :mod:`benchmarks.anchor_thresholds`, routed at the last prompt token.

    python -m benchmarks.sentence_pooling --dataset zsre counterfact --T 300
"""

from __future__ import annotations

from pathlib import Path

import torch

from lemoe_peft.routing import sentence_starts, token_marks

from .anchor_thresholds import held_out_routing, negative_name, own_expert_share, routed_shares, run_cli
from .data import requests_for

THRESHOLDS = (0.5, 0.45, 0.4)


def has_earlier_sentence(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Which ``prompts`` (P,) hold a sentence before their last one: where the routing query restarts."""
    marks = token_marks(tokenizer)
    rows = tokenizer([p.rstrip() for p in prompts]).input_ids
    return torch.tensor([bool(sentence_starts(torch.tensor([ids]), marks)[0].any()) for ids in rows])


def measure(dataset: str, T: int, cache: Path) -> list[str]:
    rows = {}
    for restart in ("off", "sentence"):
        method, routed, (_, owners), own, heading = held_out_routing(dataset, T, cache, route_restart=restart)
        scores = {
            "rephrase": routed["rephrase"][1],
            "negative": routed["negative"][1],
            "scored": routed["templates"][1],
        }
        rows[restart] = scores
    rephrases = [r.rephrase_prompts[0] for r in requests_for(dataset, T, tuning=True) if r.rephrase_prompts]
    changed = has_earlier_sentence(method.tokenizer, rephrases)
    lines = [
        heading,
        "",
        f"{int(changed.sum())} of {len(changed)} rephrases have a sentence before their last one.",
        "",
        "| query's running mean | threshold | rephrase -> own expert (with a sentence before / without) | "
        f"{negative_name(dataset)} -> any expert | same subject in the relation templates -> any expert |",
        "|---|---:|---:|---:|---:|",
    ]
    for restart, scores in rows.items():
        for value in THRESHOLDS:
            threshold = torch.full((scores["rephrase"].shape[1],), value)
            reached, negatives, templates = routed_shares(scores, owners, own, threshold)
            split = [
                round(own_expert_share(scores["rephrase"][part], owners, own[part], threshold), 3)
                for part in (changed, ~changed)
            ]
            name = "over the last sentence (sentence)" if restart == "sentence" else "over the whole prompt (off)"
            lines.append(f"| {name} | {value} | {reached} ({split[0]} / {split[1]}) | {negatives} | {templates} |")
    return [*lines, ""]


if __name__ == "__main__":
    run_cli(measure, __doc__, "sentence_pooling.md")
