"""Would the routing query tell facts apart better without the subject's tokens? A routing-only measurement.

The subject gate already decides *about whom* a text asks (an edit's anchors open only once the text names its
subject), so the query need only tell *what* is asked. Here the running-mean half of the query leaves out the
tokens of the edit's subject ("relation" pooling; the token half is unchanged) and is compared with the library's
query. Each edit has one anchor, its query at the last prompt token (where greedy generation picks the answer's
first token), open where the text names the edit's subject (the name as a string); the edits, rephrases and
negatives are those of :mod:`benchmarks.anchor_thresholds`.

    python -m benchmarks.relation_pooling --dataset zsre counterfact --T 300
"""

from __future__ import annotations

from pathlib import Path

import torch

from lemoe_peft.negatives import RELATION_TEMPLATES
from lemoe_peft.routing import causal_mean, sentence_starts

from .anchor_thresholds import negative_name, run_cli
from .methods import SETTINGS, held_out_lemoe

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


@torch.no_grad()
def last_token_queries(method, prompts: list[str], subjects: list[str], batch_size: int = 32) -> dict:
    """Each prompt's routing query at its last token, as the library pools it and with the subject's tokens left
    out of the running mean (P, k) each."""
    tuner, tokenizer = method.model.base_model, method.tokenizer
    name = tuner.resolve_adapter(None)
    (layer_name, layer), *_ = tuner.lemoe_layers(name).items()
    queries = {"library": [], "relation": []}
    for start in range(0, len(prompts), batch_size):
        chunk = [p.rstrip() for p in prompts[start : start + batch_size]]
        tokens = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right", return_offsets_mapping=True)
        offsets = tokens.pop("offset_mapping")
        with tuner.capture_layer_inputs() as captured, method.model.disable_adapter():
            method.model(**tokens, use_cache=False)
        x, valid, ids = captured[layer_name]
        last = (torch.arange(len(chunk)), valid.long().sum(dim=1) - 1)
        counted = valid.clone()
        for row, (text, subject) in enumerate(zip(chunk, subjects[start : start + batch_size], strict=True)):
            begin = text.lower().find(subject.lower())
            if begin >= 0:
                end = begin + len(subject)
                counted[row] &= ~((offsets[row, :, 0] < end) & (offsets[row, :, 1] > begin))
        counted[last] = True  # a prompt ending with its subject keeps its last token
        means, _ = causal_mean(x, counted, None, sentence_starts(ids, layer.lemoe_token_marks[name], valid)[0])
        relation = torch.cat([means, x.float()], dim=-1)[last]
        queries["library"].append(layer.route_queries(name, layer.pooled_queries(name, x, valid, ids)[last]))
        queries["relation"].append(layer.route_queries(name, relation))
    return {kind: torch.cat(parts) for kind, parts in queries.items()}


def measure(dataset: str, T: int, cache: Path) -> list[str]:
    method, _, requests, _ = held_out_lemoe(dataset, T, {**SETTINGS, "max_steps": 1}, cache)
    kinds = {
        "rephrase": [(i, r.rephrase_prompts[0]) for i, r in enumerate(requests) if r.rephrase_prompts],
        "templates": [
            (i, t.format(r.subject)) for i, r in enumerate(requests) if r.subject for t in RELATION_TEMPLATES
        ],
    }
    if dataset == "zsre":  # CounterFact's negatives name another subject: the gate keeps them out either way
        kinds["negative"] = [
            (i, p.prompt) for i, r in enumerate(requests) for p in r.locality if p.answer != r.ground_truth
        ]
    subjects = [r.subject or "" for r in requests]
    anchors = last_token_queries(method, [r.prompt for r in requests], subjects)
    lines = [
        f"#### {dataset} (held-out: {len(requests)} edits, one anchor each), routed at the last prompt token",
        "",
        "| running mean over | threshold | rephrase -> own expert | "
        + (f"{negative_name(dataset)} -> any | " if "negative" in kinds else "")
        + "same subject in the relation templates -> any |",
        "|---|---:|---:|" + ("---:|" if "negative" in kinds else "") + "---:|",
    ]
    scores = {}
    for kind, cases in kinds.items():
        owner = torch.tensor([i for i, _ in cases])
        texts = [text.lower() for _, text in cases]
        opened = torch.tensor([[s.lower() in text if s else False for s in subjects] for text in texts])
        queries = last_token_queries(method, [text for _, text in cases], [subjects[i] for i in owner])
        scores[kind] = {
            pooling: ((queries[pooling] @ anchors[pooling].T).masked_fill(~opened, float("-inf")), owner)
            for pooling in queries
        }
    for pooling, label in (("library", "the sentence (the library)"), ("relation", "the sentence but the subject")):
        for threshold in THRESHOLDS:
            best, nearest = scores["rephrase"][pooling][0].max(dim=1)
            own = ((best >= threshold) & (nearest == scores["rephrase"][pooling][1])).float().mean()
            shares = [float(own)] + [
                float((scores[kind][pooling][0].max(dim=1).values >= threshold).float().mean())
                for kind in ("negative", "templates")
                if kind in scores
            ]
            lines.append(f"| {label} | {threshold} | " + " | ".join(f"{v:.3f}" for v in shares) + " |")
    return [*lines, ""]


if __name__ == "__main__":
    run_cli(measure, __doc__, "relation_pooling.md")
