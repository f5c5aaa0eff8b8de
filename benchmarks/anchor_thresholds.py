"""Could each anchor take its own threshold? A routing-only measurement on held-out data.

Edit the first T held-out requests with LEMoE's defaults (one training step per batch: with one LEMoE layer, routing
does not depend on training), then score every anchor at the last prompt token (where greedy generation picks the
answer's first token) of: rephrases, which should reach their own edit's expert; the data set's negatives, which
should reach none (KnowEdit ZsRE test: the same subject asked about another relation; CounterFact train: the same
template asked about another subject); and each edit's subject in the package's relation templates
(:data:`lemoe_peft.negatives.RELATION_TEMPLATES`), of which every other one sets thresholds and the rest are scored.
One threshold for every anchor is compared with per-anchor thresholds set ``margin`` above the best score the
fitting templates reach on the anchor, clipped to [floor, ceiling].

    python -m benchmarks.anchor_thresholds --dataset zsre counterfact --T 300
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lemoe_peft.negatives import RELATION_TEMPLATES
from lemoe_peft.routing import experts_from_scores

from .data import CACHE
from .methods import SETTINGS, held_out_lemoe

FIXED = (0.2, 0.3, 0.4, 0.5, 0.6)
FLOORS, CEILINGS, MARGINS = (0.2, 0.3), (0.5, 0.6), (0.0, 0.05, 0.1)


@torch.no_grad()
def last_token_routing(model, tokenizer, prompts: list[str], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's routing query at its last token (P, k), and every anchor's score there (P, N), -inf where the
    anchor's subject gate is closed."""
    tuner = model.base_model
    name = tuner.resolve_adapter(None)
    (layer_name, layer), *_ = tuner.lemoe_layers(name).items()
    queries, scores = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = [p.rstrip() for p in prompts[start : start + batch_size]]
        tokens = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right")
        with tuner.capture_layer_inputs() as captured, model.disable_adapter():
            model(**tokens, use_cache=False)
        inputs = captured[layer_name]
        at = (torch.arange(len(chunk)), inputs.valid.long().sum(dim=1) - 1)
        queries.append(layer.route_queries(name, layer.pooled_queries(name, *inputs)[at]))
        scores.append(layer.anchor_scores(name, *inputs)[at])
    return torch.cat(queries), torch.cat(scores)


def own_expert_share(scores: torch.Tensor, owners: torch.Tensor, own: torch.Tensor, thresholds: torch.Tensor) -> float:
    """The share of prompts whose anchor ``scores`` (P, N), at ``thresholds``, route them to their ``own`` expert."""
    passed = scores.masked_fill(scores < thresholds, float("-inf"))
    experts, _ = experts_from_scores(passed, owners, int(owners.max()) + 1, top_k=1, temperature=1.0)
    return float((experts[:, 0] == own).float().mean())


def routed_shares(scores: dict, owners: torch.Tensor, own: torch.Tensor, thresholds: torch.Tensor) -> list[float]:
    """Rephrases reaching their own expert, negatives and scored templates reaching any, at ``thresholds`` (one per
    anchor, or one for all)."""
    reached = own_expert_share(scores["rephrase"], owners, own, thresholds)
    return [
        round(float(v), 3)
        for v in (reached, *((scores[k] >= thresholds).any(1).float().mean() for k in ("negative", "scored")))
    ]


def held_out_routing(
    dataset: str, T: int, cache: Path, **config: Any
) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor], torch.Tensor, str]:
    """The first ``T`` held-out requests edited with LEMoE's defaults (one step per batch: routing does not depend on
    training; ``config``: LEMoEConfig fields to change), and at each prompt's last token the routing query and gated
    anchor scores (:func:`last_token_routing`) of: rephrases, the data set's negatives, and each edit's subject in
    every relation template. Returns the method, those per kind, the anchor keys and their experts, each rephrase's
    own expert, and the table heading."""
    method, tokenizer, requests, experts = held_out_lemoe(dataset, T, {**SETTINGS, "max_steps": 1, **config}, cache)
    cases = [(i, r.rephrase_prompts[0]) for i, r in enumerate(requests) if r.rephrase_prompts]
    prompts = {
        "rephrase": [p for _, p in cases],
        "negative": [p.prompt for r in requests for p in r.locality if dataset != "zsre" or p.answer != r.ground_truth],
        "templates": [t.format(r.subject) for r in requests if r.subject for t in RELATION_TEMPLATES],
    }
    routed = {kind: last_token_routing(method.model, tokenizer, texts) for kind, texts in prompts.items()}
    own = torch.tensor([experts[i] for i, _ in cases])
    tuner = method.model.base_model
    name = tuner.resolve_adapter(None)
    layer = next(iter(tuner.lemoe_layers(name).values()))
    keys, owners = layer.lemoe_keys[name].float(), layer.lemoe_key_expert[name]
    heading = f"#### {dataset} (held-out: {len(requests)} edits, {len(owners)} anchors), routed at the last prompt "
    heading += "token"
    return method, routed, (keys, owners), own, heading


def negative_name(dataset: str) -> str:
    return "same subject, other relation" if dataset == "zsre" else "same template, other subject"


def measure(dataset: str, T: int, cache: Path) -> list[str]:
    _, routed, (_, owners), own, heading = held_out_routing(dataset, T, cache)
    template_scores = routed["templates"][1]
    fitting = torch.arange(len(template_scores)) % len(RELATION_TEMPLATES) % 2 == 0  # every other template fits
    scores = {"rephrase": routed["rephrase"][1], "negative": routed["negative"][1], "scored": template_scores[~fitting]}
    templates_best = template_scores[fitting].max(dim=0).values
    lines = [
        heading,
        "",
        f"| thresholds | rephrase -> own expert | {negative_name(dataset)} -> any expert | same subject in unseen "
        "relation templates -> any expert |",
        "|---|---:|---:|---:|",
    ]
    for value in FIXED:
        shares = routed_shares(scores, owners, own, torch.full_like(templates_best, value))
        lines.append(f"| {value} for every anchor | " + " | ".join(map(str, shares)) + " |")
    for floor, ceiling, margin in itertools.product(FLOORS, CEILINGS, MARGINS):
        thresholds = (templates_best + margin).clamp(floor, ceiling)  # -inf (no template opens it): the floor
        shares = routed_shares(scores, owners, own, thresholds)
        lines.append(
            f"| per anchor: templates' best + {margin}, in [{floor}, {ceiling}] | "
            + " | ".join(map(str, shares))
            + " |"
        )
    return [*lines, ""]


def run_cli(measure: Callable[[str, int, Path], list[str]], description: str, out: str) -> None:
    """Measure each ``--dataset`` and write the tables to ``--out`` (default ``benchmarks/results/routing/<out>``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["zsre", "counterfact"])
    parser.add_argument("--T", type=int, default=300)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "results" / "routing" / out)
    args = parser.parse_args()
    lines = [line for dataset in args.dataset for line in measure(dataset, args.T, args.cache)]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(measure, __doc__, "anchor_thresholds.md")
