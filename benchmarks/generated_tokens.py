"""Generated tokens routed two ways on the same edits: edit the first T held-out requests with LEMoE (the benchmark's
settings, updated by ``--settings``), save the adapter, and score it reloaded with ``route_generated_tokens`` =
"prompt_experts" (the default: a generated token routes only to the experts the prompt's last token routed to) and
"any" (it routes by its own query). Training is the same, so the difference is the rule alone.

    python -m benchmarks.generated_tokens --dataset zsre --T 100 --seed 0 1 2
    python -m benchmarks.generated_tokens --dataset zsre --T 100 --settings '{"route_subject_threshold": 0.6}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from peft import PeftModel

from lemoe_peft import (
    GenerationSettings,
    LEMoEConfig,
    evaluate_edits,
    locality_generation_reference,
    locality_reference,
)
from lemoe_peft.config import ROUTE_GENERATED_TOKENS
from lemoe_peft.edit_log import write_json_atomic

from .data import CACHE
from .methods import SETTINGS, held_out_lemoe


def compare(dataset: str, T: int, settings: dict, cache: Path) -> dict:
    """Both rules' metrics (and per-case records) after editing ``T`` held-out requests with ``settings``."""
    method, tokenizer, requests, _ = held_out_lemoe(dataset, T, settings, cache)
    generation = GenerationSettings()
    with method.model.disable_adapter():
        reference = locality_reference(method.model, tokenizer, requests)
        generation_reference = locality_generation_reference(method.model, tokenizer, requests, generation)
    result = {"dataset": dataset, "T": len(requests), "settings": settings}
    with tempfile.TemporaryDirectory() as folder:
        method.model.save_pretrained(folder)
        base = method.model.unload()
        for rule in ROUTE_GENERATED_TOKENS:
            config = LEMoEConfig.from_pretrained(folder)
            config.route_generated_tokens = rule
            model = PeftModel.from_pretrained(base, folder, config=config)
            scores = evaluate_edits(
                model, tokenizer, requests, reference=reference, generation_reference=generation_reference
            )
            result[rule] = {k: v for k, v in scores.items() if k != "protocol"}
            base = model.unload()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--settings", default="{}", help="JSON: settings that differ from the benchmark's")
    parser.add_argument("--name", default="default", help="names the output files")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "generated_tokens")
    args = parser.parse_args()
    for seed in args.seed:
        settings = {**SETTINGS, **json.loads(args.settings), "seed": seed}
        result = compare(args.dataset, args.T, settings, args.cache)
        write_json_atomic(args.out / f"{args.dataset}-T{args.T}-{args.name}-seed{seed}.json", result)
        for rule in ROUTE_GENERATED_TOKENS:
            shown = {k: round(v, 3) for k, v in result[rule].items() if k.endswith("gen_acc")}
            print(f"{args.dataset} T={args.T} {args.name} seed {seed} {rule}: {shown}", flush=True)


if __name__ == "__main__":
    main()
