"""Could the routing query read only the last sentence? A routing-only measurement on held-out data.

A sixth of CounterFact's rephrases put an unrelated sentence before the question ("It is found in Palestine. M5
motorway can be found in"); in the running mean over the whole prompt that sentence outweighs the question, and
most of these reach no expert. Here the query's running mean restarts after the last sentence end (a token ending
in ".", "!" or "?" followed by one beginning with whitespace) before the last prompt token; anchors, taken from edit
prompts without such an end, do not change. Edits, rephrases and negatives are those of
:mod:`benchmarks.anchor_thresholds`, routed at the last prompt token.

    python -m benchmarks.sentence_pooling --dataset zsre counterfact --T 300
"""

from __future__ import annotations

from pathlib import Path

import torch

from .anchor_thresholds import held_out_routing, negative_name, own_expert_share, routed_shares, run_cli

THRESHOLDS = (0.5, 0.45, 0.4)


def measure(dataset: str, T: int, cache: Path) -> list[str]:
    rows = {}
    for restart in (False, True):
        _, routed, (_, owners), own, heading = held_out_routing(dataset, T, cache, sentence_ends=restart)
        scores = {
            "rephrase": routed["rephrase"][1],
            "negative": routed["negative"][1],
            "scored": routed["templates"][1],
        }
        rows[restart] = scores
    changed = (rows[True]["rephrase"] != rows[False]["rephrase"]).any(dim=1)  # rephrases with a sentence before
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
            name = "over the last sentence" if restart else "over the whole prompt (as it is)"
            lines.append(f"| {name} | {value} | {reached} ({split[0]} / {split[1]}) | {negatives} | {templates} |")
    return [*lines, ""]


if __name__ == "__main__":
    run_cli(measure, __doc__, "sentence_pooling.md")
