"""Why LEMoE routes the way it does: routing-only measurements on held-out data (no training).

For each design, anchors are built from held-out edit prompts (+ targets) at the positions the editor anchors, then
routed *at the first answer position* (the last prompt token, where generation decides whether the expert fires):
rephrased prompts, which should reach their own edit's expert, and prompts that should reach none: on KnowEdit's
ZsRE test split the same subject asked about another relation, on CounterFact's train split the same relation and
template asked about another subject (its neighbourhood prompts). Experts hold 10 edits each, in arrival order.
A second table compares the width of the keys (``route_key_dim``) for the default design, a third where subject keys
come from (the edit prompt, or the subject read after the editor's ``subject_lead``, or either, as the editor takes
them).

    python -m benchmarks.routing_probe            # ZsRE test-all (KnowEdit) and CounterFact train, 300 edits each
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from lemoe_peft.editor import EditorSettings, calibration_texts
from lemoe_peft.negatives import subject_span
from lemoe_peft.routing import (
    causal_mean,
    route_projection,
    subject_presence,
    token_counts,
    whiten,
    whitening_statistics,
)
from lemoe_peft.teacher_forcing import encode, token_position

from .data import CACHE, load_base, requests_for

EXPERT_SIZE = 10
# route_pooling and the weight of the token part (route_token_weight)
QUERIES = {
    "causal mean": ("causal_mean", 0.0),
    "mean + last token (3:1)": ("mean_and_token", 0.25),
    "mean + last token (1:1)": ("mean_and_token", 0.5),
    "last token": ("token", 1.0),
}
KEY_DIM = 256  # the default route_key_dim: mean_and_token keys hold two halves of 128
SUBJECT_GATES = (None, 0.6, 0.65)
THRESHOLDS = (0.4, 0.5, 0.6)
KEY_DIMS = (0, 128, 256, 512)  # 0: the full input width per half
SUBJECT_LEAD = EditorSettings().subject_lead  # a subject read on its own (a first token's state is alike for all)


def _layer_inputs(model, tokenizer, pairs, layer: int, batch_size: int = 32):
    """Per (prompt, answer) pair: the down_proj input at ``layer`` (T, d) and the positions that predict the answer;
    an answer of None gives the prompt alone (its last position is the decision position)."""
    captured = {}
    module = model.model.layers[layer].mlp.down_proj
    handle = module.register_forward_pre_hook(lambda m, args: captured.__setitem__("x", args[0].detach()))
    rows = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = encode(tokenizer, [(p, a or "x") for p, a in chunk])
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            for i, (_, answer) in enumerate(chunk):
                predicts = batch.predicts[i]
                length = int(batch.attention_mask[i].sum()) if answer else int(predicts.nonzero()[0]) + 1
                rows.append((captured["x"][i, :length], predicts[:length] if answer else None))
    finally:
        handle.remove()
    return rows


class Design:
    """One routing design on a fixed whitening: ``stats`` is (mean, projection) of one query part, see
    ``route_projection``; subject keys and tokens meet in that space too, as in ``LEMoELayer``."""

    def __init__(self, stats, token_weight: float, subject_gate: float | None) -> None:
        self.stats, self.weight, self.gate = stats, token_weight, subject_gate

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """(T, k) queries whose dot products are the design's scores, (1 - w) cos(means) + w cos(tokens)."""
        parts = [(1 - self.weight, causal_mean(x[None])[0][0]), (self.weight, x.float())]
        return torch.cat([whiten(p, *self.stats, normalize=True) * w**0.5 for w, p in parts if w > 0], dim=-1)

    def presence(self, x: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
        """(T, S) best subject score so far."""
        scores = whiten(x.float(), *self.stats, normalize=True) @ subjects.T
        return subject_presence(scores[None], token_counts(x[None], None), None)[0]


def probe(dataset: str, edits: int, layer: int, cache: Path) -> list[str]:
    model, tokenizer = load_base(cache)
    requests = [r for r in requests_for(dataset, 4 * edits, tuning=True) if r.rephrase_prompts and r.locality][:edits]
    requests = requests[: len(requests) // EXPERT_SIZE * EXPERT_SIZE]
    if dataset == "zsre":  # other relations of the same subject: drop the probes that restate the edited question
        negatives = [(i, p.prompt) for i, r in enumerate(requests) for p in r.locality if p.answer != r.ground_truth]
        negative_name = "same subject, other relation"
    else:
        negatives = [(i, p.prompt) for i, r in enumerate(requests) for p in r.locality]
        negative_name = "same template, other subject"
    edit_rows = _layer_inputs(model, tokenizer, [(r.prompt, r.target_new) for r in requests], layer)
    rephrase_rows = _layer_inputs(model, tokenizer, [(r.rephrase_prompts[0], None) for r in requests], layer)
    negative_rows = _layer_inputs(model, tokenizer, [(p, None) for _, p in negatives], layer)
    calibration = _layer_inputs(model, tokenizer, [(t, None) for t in calibration_texts()], layer)
    mean, basis, scale = whitening_statistics(torch.cat([causal_mean(x[None])[0][0] for x, _ in calibration]), 64)
    subject_at = []
    for request in requests:
        span = subject_span(request)
        position = None if span is None else token_position(tokenizer, request.prompt.rstrip(), span[1])
        subject_at.append(position if position is not None and position >= 1 else None)
    owner = torch.arange(len(requests)) // EXPERT_SIZE

    lead_rows = _layer_inputs(model, tokenizer, [(SUBJECT_LEAD.format(r.subject or ""), None) for r in requests], layer)

    def token_string(text: str) -> str:
        return "," + ",".join(map(str, tokenizer(text, add_special_tokens=False).input_ids)) + ","

    subject_tokens = [{token_string(v + r.subject)[:-1] for v in ("", " ")} for r in requests]

    def named(prompts: list[str]) -> torch.Tensor:
        """(prompts, edits): the edit's subject tokens occur in the prompt (read with or without a leading space)."""
        strings = [token_string(p) for p in prompts]
        return torch.tensor([[any(v + "," in s for v in variants) for variants in subject_tokens] for s in strings])

    rephrase_named = named([r.rephrase_prompts[0] for r in requests])
    negative_named = named([p for _, p in negatives])

    def routed(
        design: Design, lead_keys: str = "also", by_name: str = "off"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (prompts, keys) of the rephrases and of the negatives at their decision positions, and the keys'
        experts. ``lead_keys``: subject keys from the edit prompt ("no"), from the subject after a lead ("only"),
        or either ("also")."""
        keys, key_owner, key_edit = [], [], []
        for i, (x, predicts) in enumerate(edit_rows):
            q = design.query(x)[predicts]
            keys.append(q)
            key_owner += [int(owner[i])] * len(q)
            key_edit += [i] * len(q)
        keys, key_owner, key_edit = torch.cat(keys), torch.tensor(key_owner), torch.tensor(key_edit)
        subjects = torch.stack(
            [
                whiten(x[p if p is not None else 0].float(), *design.stats, normalize=True) * (p is not None)
                for (x, _), p in zip(edit_rows, subject_at, strict=True)
            ]
        )
        gated = torch.tensor([p is not None for p in subject_at])[key_edit]
        leads = torch.stack([whiten(x[-1].float(), *design.stats, normalize=True) for x, _ in lead_rows])
        key_sets = {"no": [subjects], "only": [leads], "also": [subjects, leads]}[lead_keys]

        def scores(x: torch.Tensor, name_read: torch.Tensor) -> torch.Tensor:
            s = design.query(x)[-1] @ keys.T
            open_ = torch.ones(len(keys), dtype=torch.bool)
            if design.gate is not None:
                read = torch.stack([design.presence(x, keys_)[-1] for keys_ in key_sets]).amax(dim=0)
                open_ = ~gated | (read[key_edit] >= design.gate)
            if by_name == "only":
                open_ = name_read[key_edit]
            elif by_name == "and":
                open_ = open_ & name_read[key_edit]
            elif by_name == "or":
                open_ = open_ | name_read[key_edit]
            return s.masked_fill(~open_, float("-inf"))

        return (
            torch.stack([scores(x, n) for (x, _), n in zip(rephrase_rows, rephrase_named, strict=True)]),
            torch.stack([scores(x, n) for (x, _), n in zip(negative_rows, negative_named, strict=True)]),
            key_owner,
        )

    def shares(rephrase_scores, negative_scores, key_owner, threshold: float) -> tuple[float, float]:
        best = rephrase_scores.max(dim=1)
        own = (best.values >= threshold) & (key_owner[best.indices] == owner)
        return float(own.float().mean()), float((negative_scores.max(dim=1).values >= threshold).float().mean())

    parts = {pooling: 2 if pooling == "mean_and_token" else 1 for pooling, _ in QUERIES.values()}
    lines = [
        f"#### {dataset} (held-out: {len(requests)} edits, layer {layer}), routed at the first answer position",
        "",
        f"Keys {KEY_DIM} wide (`route_key_dim`; mean + last token: {KEY_DIM // 2} for each part).",
        "",
        f"| query | subject gate | threshold | rephrase -> own expert | {negative_name} -> any expert |",
        "|---|---|---:|---:|---:|",
    ]
    for (query_name, (pooling, weight)), gate in itertools.product(QUERIES.items(), SUBJECT_GATES):
        stats = (mean, route_projection(basis, scale, KEY_DIM // parts[pooling]))
        scored = routed(Design(stats, weight, gate))
        for threshold in THRESHOLDS:
            own, reached = shares(*scored, threshold)
            gate_name = gate if gate is not None else "none"
            lines.append(f"| {query_name} | {gate_name} | {threshold} | {own:.2f} | {reached:.2f} |")
    lines += [
        "",
        f"Key space (the default: mean + last token 1:1, subject gate 0.65, threshold 0.5; per half, "
        f"{basis.shape[1]} whitened principal directions kept exactly, the rest reduced by a fixed random projection):",
        "",
        f"| route_key_dim | rephrase -> own expert | {negative_name} -> any expert |",
        "|---:|---:|---:|",
    ]
    width = basis.shape[0]
    for dim in KEY_DIMS:
        projection = route_projection(basis, scale, (dim or 2 * width) // 2)
        own, reached = shares(*routed(Design((mean, projection), 0.5, 0.65)), 0.5)
        lines.append(f"| {dim or f'{2 * width} (full)'} | {own:.3f} | {reached:.3f} |")
    lines += [
        "",
        f"Subject keys (the default query, threshold 0.5): from the edit prompt, from the subject read after the "
        f'lead "{SUBJECT_LEAD}", or either (the editor\'s):',
        "",
        f"| subject keys | subject gate | rephrase -> own expert | {negative_name} -> any expert |",
        "|---|---:|---:|---:|",
    ]
    stats = (mean, route_projection(basis, scale, KEY_DIM // 2))
    for (name, lead_keys), gate in itertools.product(
        {"edit prompt": "no", "after the lead": "only", "either": "also"}.items(), SUBJECT_GATES[1:] + (0.7,)
    ):
        own, reached = shares(*routed(Design(stats, 0.5, gate), lead_keys), 0.5)
        lines.append(f"| {name} | {gate} | {own:.3f} | {reached:.3f} |")
    own_edit = torch.tensor([i for i, _ in negatives])
    negatives_naming_own = float(negative_named[torch.arange(len(negatives)), own_edit].float().mean())
    lines += [
        "",
        "Subject gate by name (the default query): an edit's anchors serve a prompt whose tokens contain the edit's "
        "subject (tokenized with and without a leading space), alone or combined with the editor's gate (either "
        "subject key, 0.65). Share of rephrases and negatives that name their edit's subject: "
        f"{rephrase_named.diagonal().float().mean():.3f}, {negatives_naming_own:.3f}.",
        "",
        f"| gate | threshold | rephrase -> own expert | {negative_name} -> any expert |",
        "|---|---:|---:|---:|",
    ]
    mean_stats = (mean, route_projection(basis, scale, KEY_DIM))
    for name, design, by_name in [
        ("keys (the editor's)", Design(stats, 0.5, 0.65), "off"),
        ("name only", Design(stats, 0.5, None), "only"),
        ("keys and name", Design(stats, 0.5, 0.65), "and"),
        ("keys or name", Design(stats, 0.5, 0.65), "or"),
        ("name only, causal mean query", Design(mean_stats, 0.0, None), "only"),
        ("name only, mean + last token (3:1)", Design(stats, 0.25, None), "only"),
    ]:
        scored = routed(design, "also", by_name)
        for threshold in (0.3,) + THRESHOLDS:
            own, reached = shares(*scored, threshold)
            lines.append(f"| {name} | {threshold} | {own:.3f} | {reached:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--layer", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "routing_probe.md")
    args = parser.parse_args()
    lines = []
    for dataset in ("zsre", "counterfact"):
        lines += probe(dataset, args.edits, args.layer, CACHE) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
