"""Could routing compare queries in a metric that ignores wording? A routing-only measurement on held-out data.

The routing space whitens queries against generic text. This probe whitens them once more against the scatter of
*paraphrase pairs* (two wordings of one question), ``M = (S + lam * mean eig(S) * I)^(-1/2)``, so that directions in
which paraphrases differ count less; queries and anchor keys are both mapped by ``M`` and scored by cosine. ``S`` is
fitted on one of: held-out rephrase pairs of KnowEdit ZsRE (test-all records 1000-1303), of CounterFact (train records
1000-2999), or wordings written here (a relation asked in four ways about made-up subjects), the only kind a package
could ship. Edits, rephrases and negatives are those of :mod:`benchmarks.anchor_thresholds` (the first T held-out
requests, LEMoE's defaults, routed at the last prompt token); the fitting records are disjoint from them.

    python -m benchmarks.paraphrase_metric --dataset zsre counterfact --T 300
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .anchor_thresholds import held_out_routing, last_token_routing, negative_name, routed_shares, run_cli
from .data import requests_for

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SHRINKAGE = (0.1, 1.0)
# one relation per row, asked in four ways; {} is the subject
WORDINGS = (
    ("{} was born in", "The birthplace of {} is", "Where was {} born?", "{} came into the world in the city of"),
    ("{} is located in", "Where is {} located?", "The location of {} is", "{} can be found in"),
    ("{} works for", "The employer of {} is", "Who does {} work for?", "{} is employed by"),
    ("The occupation of {} is", "What does {} do for a living?", "{} works as a", "By profession, {} is a"),
    ("{} was founded in", "When was {} founded?", "The founding year of {} is", "{} was established in"),
    ("{} died in", "Where did {} die?", "The place of death of {} is", "{} passed away in"),
    ("Who founded {}?", "The founder of {} is", "{} was founded by", "{} was started by"),
    ("The mother tongue of {} is", "{} spoke the language", "What is the native language of {}?", "{} first spoke"),
    ("The capital of {} is", "What is the capital of {}?", "{}'s capital city is", "The seat of government of {} is"),
    ("Which position does {} play?", "{} plays the position of", "On the team, {} plays as", "{} is a player in the"),
    ("The genre of {} is", "What genre is {}?", "{} belongs to the genre of", "{} is a work in the genre"),
    ("Who wrote {}?", "The author of {} is", "{} was written by", "The writer of {} is"),
)
SUBJECTS = (
    "Marta Kowalczyk", "Johan Brenner", "Aiko Tanabe", "the Velmar Institute", "Port Aldric", "Rivera Motors",
    "Lake Osmund", "Kristof Halvorsen", "the Northgate Symphony", "Bellmont", "Sir Edwin Crale", "Tavora",
    "Nadia El-Sayed", "the Corvin Library", "Hollins Park", "Pieter de Wulf", "Esmeralda Ruiz", "Fjordvik",
    "Grayson Holt", "Kestrel Games",
)  # fmt: skip


def paraphrase_scatter(model, tokenizer, source: str) -> torch.Tensor:
    """(k, k) second moment of the differences between paraphrases in the routing space."""
    if source == "wordings":
        groups = [[w.format(s) for w in relation] for relation in WORDINGS for s in SUBJECTS]
        queries, _ = last_token_routing(model, tokenizer, [p for group in groups for p in group])
        grouped = queries.reshape(len(groups), len(WORDINGS[0]), -1)
        differences = (grouped - grouped.mean(dim=1, keepdim=True)).flatten(0, 1)
    else:
        records = [r for r in requests_for(source, 3000, tuning=True)[1000:] if r.rephrase_prompts]
        prompts, _ = last_token_routing(model, tokenizer, [r.prompt for r in records])
        rephrases, _ = last_token_routing(model, tokenizer, [r.rephrase_prompts[0] for r in records])
        differences = prompts - rephrases
    differences = differences.double()
    return differences.T @ differences / len(differences)


def measure(dataset: str, T: int, cache: Path) -> list[str]:
    method, routed, (keys, owners), own, heading = held_out_routing(dataset, T, cache)
    model, tokenizer = method.model, method.tokenizer
    gates = {kind: torch.isfinite(scores) for kind, (_, scores) in routed.items()}
    metrics = {"none (the routing space as it is)": torch.eye(keys.shape[1])}
    for source in ("zsre", "counterfact", "wordings"):
        eigenvalues, vectors = torch.linalg.eigh(paraphrase_scatter(model, tokenizer, source))
        for shrinkage in SHRINKAGE:
            inverse_root = (eigenvalues + shrinkage * eigenvalues.mean()).rsqrt()
            metrics[f"{source} pairs, lam {shrinkage}"] = ((vectors * inverse_root) @ vectors.T).float()
    lines = [
        heading,
        "",
        f"| paraphrase scatter | threshold | rephrase -> own expert | {negative_name(dataset)} -> any expert | "
        "same subject in relation templates -> any expert |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, metric in metrics.items():
        mapped_keys = F.normalize(keys @ metric, dim=-1)
        scores = {
            kind: (F.normalize(queries @ metric, dim=-1) @ mapped_keys.T).masked_fill(~gates[kind], float("-inf"))
            for kind, (queries, _) in routed.items()
        }
        scores["scored"] = scores.pop("templates")  # every template is scored here
        for threshold in THRESHOLDS:
            values = routed_shares(scores, owners, own, torch.tensor(threshold))
            lines.append(f"| {label} | {threshold} | " + " | ".join(map(str, values)) + " |")
    return [*lines, ""]


if __name__ == "__main__":
    run_cli(measure, __doc__, "paraphrase_metric.md")
