"""One benchmark run: a stream of T edits with one method, evaluated right after each batch (teacher-forced metrics
only, to save time) and after the whole stream (teacher-forced and generation-based metrics). Runs in its own process
(``python -m benchmarks.run ...``) so its peak memory is its own."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from statistics import mean

import peft
import torch
import transformers

from lemoe_peft import GenerationSettings, evaluate_edits, locality_generation_reference, locality_reference
from lemoe_peft.edit_log import write_json_atomic

from .data import CACHE, DATASETS, MODEL_NAME, TUNING, load_base, requests_for
from .methods import METHODS, SETTINGS

METRICS = ("rewrite_acc", "rephrase_acc", "locality_acc")
GENERATION_METRICS = ("rewrite_gen_acc", "rephrase_gen_acc", "locality_gen_acc")
OTHER_LOCALITY = (
    "locality_other_gen_acc",
    "locality_other_acc",
)  # locality on the probes that ask none of the edited facts


def _reference_by_request(base, tokenizer, requests, chat: bool):
    """The unedited model's locality predictions, per request (computed before any edit)."""
    flat = iter(locality_reference(base, tokenizer, requests, chat))
    return [[next(flat) for _ in request.locality] for request in requests]


def run(
    method_name: str,
    dataset: str,
    T: int,
    settings: dict,
    cache: Path,
    save_adapter: Path | None,
    tuning: bool,
    chat: bool = False,
) -> dict:
    """Edit the first ``T`` requests of ``dataset`` with ``method_name`` and score them after the whole stream (with
    ``chat``, every prompt asked through the tokenizer's chat template)."""
    torch.manual_seed(settings["seed"])
    base, tokenizer = load_base(cache)
    requests = requests_for(dataset, T, tuning=tuning)
    reference = _reference_by_request(base, tokenizer, requests, chat)
    generation = GenerationSettings()
    generation_reference = locality_generation_reference(base, tokenizer, requests, generation, chat=chat)
    position = {id(r): i for i, r in enumerate(requests)}
    method = METHODS[method_name](base, tokenizer, settings)
    batches = method.plan(requests)

    edit_seconds, right_after = 0.0, []
    for batch in batches:
        started = time.perf_counter()
        method.edit_batch(batch)
        edit_seconds += time.perf_counter() - started
        batch_reference = [t for r in batch for t in reference[position[id(r)]]]
        right_after.append(
            evaluate_edits(method.model, tokenizer, batch, reference=batch_reference, generation=False, chat=chat)
        )

    protocol = {
        "method": method_name,
        "dataset": dataset,
        "data": f"{(TUNING if tuning else DATASETS)[dataset].name}, first {len(requests)} valid records",
        "T": len(requests),
        "batch_size": method.settings["batch_size"],
        "seed": settings["seed"],
        "model": MODEL_NAME,
        "settings": method.settings,
    }
    flat_reference = [t for per_request in reference for t in per_request]
    if not method.padding_safe:
        generation = GenerationSettings(batch_size=1)
    started = time.perf_counter()
    final = evaluate_edits(
        method.model,
        tokenizer,
        requests,
        reference=flat_reference,
        generation_reference=generation_reference,
        generation=generation,
        protocol=protocol,
        chat=chat,
    )
    evaluation_seconds = time.perf_counter() - started
    weights = [len(b) for b in batches]
    after_each = {
        m: sum(w * r[m] for w, r in zip(weights, right_after, strict=True) if m in r) / len(requests)
        for m in METRICS
        if all(m in r for r in right_after)
    }
    if save_adapter is not None and hasattr(method.model, "save_pretrained") and method_name.startswith("LEMoE"):
        method.model.save_pretrained(save_adapter)
    return {
        "protocol": final["protocol"],
        "after_stream": {m: final[m] for m in (*GENERATION_METRICS, *METRICS, *OTHER_LOCALITY) if m in final},
        "after_each_batch": after_each,
        "seconds_per_edit": edit_seconds / len(requests),
        "edit_seconds": edit_seconds,
        "evaluation_seconds": evaluation_seconds,  # after the stream, both metric families
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "adapter_bytes_per_edit": method.adapter_bytes() / len(requests),
        "batches": len(batches),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "cases": final["cases"],
        "mean_after_stream": mean(final[m] for m in METRICS if m in final),  # teacher-forced, as before
        "mean_gen_after_stream": mean(final[m] for m in GENERATION_METRICS if m in final),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", required=True, choices=sorted(METHODS))
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--T", type=int, required=True)
    parser.add_argument(
        "--settings", default="{}", help="JSON: settings that differ from the lifelong benchmark's (methods.SETTINGS)"
    )
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save-adapter", type=Path)
    parser.add_argument("--tuning", action="store_true", help="use the held-out tuning data instead")
    parser.add_argument("--ask-in-chat", action="store_true", help="ask every prompt through the chat template")
    args = parser.parse_args()
    settings = {**SETTINGS, **json.loads(args.settings)}
    result = run(
        args.method, args.dataset, args.T, settings, args.cache, args.save_adapter, args.tuning, args.ask_in_chat
    )
    write_json_atomic(args.out, result)


if __name__ == "__main__":
    main()
