"""Why module insertion freezes earlier experts: which positions of each batch's training rows reached an *earlier*
expert while that batch trained, and whether the edits that LEMoE w/o freezing lost sit in those experts.

Reads what ``benchmarks.lifelong`` wrote for a data set and T: the saved LEMoE adapter (its anchors and edit log) and
the per-case results of LEMoE and of LEMoE w/o freezing. Anchors depend only on the adaptor layer's input, which no
expert of that layer changes, so both runs routed every training row alike; restricting routing to the experts that
existed when a batch trained gives the routing that batch saw.

    python -m benchmarks.freezing_probe --dataset zsre counterfact --T 1000     # reads bench-results/full/
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel

from lemoe_peft.edit_log import write_json_atomic
from lemoe_peft.layer import LEMoELayer
from lemoe_peft.teacher_forcing import answer_logits, encode

from .data import CACHE, load_base


@contextlib.contextmanager
def experts_up_to(layer: LEMoELayer, adapter: str, newest: int) -> Iterator[None]:
    """Route as the layer did before any expert after ``newest`` existed (their anchors are out of reach)."""
    thresholds = layer.lemoe_key_threshold[adapter]
    saved = thresholds.clone()
    thresholds[layer.lemoe_key_expert[adapter] > newest] = float("inf")
    try:
        yield
    finally:
        thresholds.copy_(saved)


def _case_key(case: dict) -> tuple[str, str]:
    return case["prompt"], case["target_new"]


def probe(results: Path, dataset: str, T: int, cache: Path) -> dict:
    base, tokenizer = load_base(cache)
    model = PeftModel.from_pretrained(base, str(results / dataset / "adapters" / f"lemoe-T{T}")).eval()
    adapter = model.active_adapter
    (layer,) = model.base_model.lemoe_layers(adapter).values()
    log = model.peft_config[adapter].edit_log
    counts = {"batches": len(log), "batches_reaching_earlier": 0, "positions": 0, "positions_reaching_earlier": 0}
    counts |= {"answer_positions": 0, "answer_positions_reaching_earlier": 0}
    reached: set[int] = set()  # experts that some later batch's training rows reached
    for newest, record in enumerate(log):
        batch = encode(tokenizer, [(r["prompt"], r["target_new"]) for r in record["requests"]])
        with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
            answer_logits(model, batch)
        with experts_up_to(layer, adapter, newest):
            experts, _ = layer.route_sequences(adapter, *next(iter(captured.values())))
        chosen = experts[..., 0]
        earlier = (chosen >= 0) & (chosen < newest) & batch.attention_mask.bool()
        counts["batches_reaching_earlier"] += int(earlier.any())
        counts["positions"] += int(batch.attention_mask.sum())
        counts["positions_reaching_earlier"] += int(earlier.sum())
        counts["answer_positions"] += int(batch.predicts.sum())
        counts["answer_positions_reaching_earlier"] += int((earlier & batch.predicts).sum())
        reached.update(chosen[earlier].tolist())

    expert_of = {(r["prompt"], r["target_new"]): e for e, record in enumerate(log) for r in record["requests"]}
    frozen = json.loads((results / dataset / f"lemoe-T{T}.json").read_text())["cases"]
    unfrozen = json.loads((results / dataset / f"lemoe-wo-freezing-T{T}.json").read_text())["cases"]
    held = [(a, b) for a, b in zip(frozen, unfrozen, strict=True) if a["rewrite_gen_acc"] == 1.0]
    lost = [expert_of[_case_key(a)] in reached for a, b in held if b["rewrite_gen_acc"] < 1.0]
    kept = [expert_of[_case_key(a)] in reached for a, b in held if b["rewrite_gen_acc"] == 1.0]
    return {
        "dataset": dataset,
        "T": T,
        **counts,
        "experts_reached_later": len(reached),
        "lost_without_freezing": len(lost),
        "lost_in_reached_experts": sum(lost),
        "kept_without_freezing": len(kept),
        "kept_in_reached_experts": sum(kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("bench-results") / "full", help="lifelong's --out")
    parser.add_argument("--dataset", nargs="+", default=["zsre", "counterfact"])
    parser.add_argument("--T", type=int, default=1000)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, help="JSON file (default: RESULTS/freezing_probe.json)")
    args = parser.parse_args()
    rows = [probe(args.results, dataset, args.T, args.cache) for dataset in args.dataset]
    write_json_atomic(args.out or args.results / "freezing_probe.json", rows)
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
