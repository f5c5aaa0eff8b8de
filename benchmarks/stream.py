"""A long lifelong stream (10,000 edits of CounterFact train), LEMoE only, resumable across processes and sessions.

The stream arrives in chunks of 1,000 records; each chunk is batched by the editor's `plan` and edited with the
benchmark's settings, the adapter is checkpointed atomically every 10 batches, and a rerun of the same command
resumes from the checkpoint.
At every checkpoint T (edits made so far) it scores all T edits teacher-forced and a fixed random sample of 1,000 of
them under greedy generation, and measures seconds per edit of each slice of 1,000 edits, inference latency against
the base model (interleaved in one process), adapter bytes per edit, the time to load the adapter and the peak memory.

    python -m benchmarks.lifelong --dataset counterfact-train --T 10000
"""

from __future__ import annotations

import json
import random
import resource
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import GenerationSettings, LEMoEConfig, LEMoEEditor, evaluate_edits
from lemoe_peft.adapter_file import ADAPTER_WEIGHTS
from lemoe_peft.checkpoint import has_checkpoint
from lemoe_peft.edit_log import write_json_atomic

from . import latency
from .data import MODEL_NAME, STREAMS, load_base, requests_for
from .run import GENERATION_METRICS, OTHER_LOCALITY
from .run import METRICS as TEACHER_FORCED_METRICS

CHUNK = 1000
GENERATION_SAMPLE = 1000
ROUTING = (
    "route_pooling",
    "route_token_weight",
    "route_key_dim",
    "route_subject_threshold",
    "route_subject_margin",
    "route_subject_names",
    "route_generated_tokens",
)
METRICS = (*GENERATION_METRICS, *TEACHER_FORCED_METRICS, *OTHER_LOCALITY)


def checkpoints_for(T: int) -> list[int]:
    return sorted({t for t in (1000, 2000, 5000, T) if t <= T})


def slice_seconds(edit_log: list[dict], size: int = CHUNK) -> list[float]:
    """Seconds per edit of each slice of ``size`` edits, in stream order, from the batches' logged edit times."""
    totals: dict[int, list[float]] = {}
    done = 0
    for record in edit_log:
        count = len(record["requests"])
        slot = totals.setdefault(done // size, [0.0, 0])
        slot[0] += record["seconds"]
        slot[1] += count
        done += count
    return [round(seconds / count, 4) for seconds, count in (totals[i] for i in sorted(totals))]


def _score(model, tokenizer, requests, seed: int) -> dict:
    """Teacher-forced metrics on every edit so far, generation-based ones on a fixed sample of them; ``locality_other``
    leaves out the locality probes that ask a fact edited anywhere in the stream so far."""
    started = time.perf_counter()
    forced = evaluate_edits(model, tokenizer, requests, generation=False)
    sample = random.Random(seed).sample(requests, min(GENERATION_SAMPLE, len(requests)))
    generated = evaluate_edits(model, tokenizer, sample, generation=GenerationSettings(), edits=requests)
    return {
        **{m: forced[m] for m in METRICS if m in forced},
        **{m: generated[m] for m in METRICS if m.endswith("_gen_acc") and m in generated},
        "generation_sample": len(sample),
        "evaluation_seconds": time.perf_counter() - started,
    }


def _checkpoint_result(model, tokenizer, done, adapter: Path, cache: Path, settings: dict, T: int) -> dict:
    config = model.peft_config["default"]
    metrics = _score(model, tokenizer, done, settings["seed"])
    fresh_base = load_base(cache)[0]
    started = time.perf_counter()
    loaded = PeftModel.from_pretrained(fresh_base, str(adapter))
    load_seconds = time.perf_counter() - started
    del loaded, fresh_base
    timing = latency.measure(cache, {config.num_experts: adapter}, done[0].prompt)
    return {
        "protocol": {
            "method": "LEMoE",
            "dataset": "counterfact-train",
            "data": f"{STREAMS['counterfact-train'].name}: the first {T} valid records as one stream, in chunks of "
            f"{CHUNK} (each batched by the editor's plan on arrival); its first 100 records are the held-out "
            "tuning data",
            "T": len(done),
            "stream_T": T,
            "model": MODEL_NAME,
            "settings": {**settings, **{k: getattr(config, k) for k in ROUTING}},
            "generation": f"greedy generate() on a fixed random sample of {GENERATION_SAMPLE} of the edits so far",
        },
        "after_stream": metrics,
        "seconds_per_edit_by_slice": slice_seconds(config.edit_log),
        "slice": CHUNK,
        "latency": timing,
        "adapter_bytes_per_edit": (adapter / ADAPTER_WEIGHTS).stat().st_size / len(done),
        "adapter_config_bytes_per_edit": (adapter / "adapter_config.json").stat().st_size / len(done),
        "adapter_load_seconds": load_seconds,
        "experts": config.num_experts,
        "anchors": config.num_anchors,
        "subjects": config.num_subjects,
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "machine": f"{torch.get_num_threads()} threads",
    }


def run(T: int, settings: dict, cache: Path, out: Path, rescore: bool = False) -> list[dict]:
    """Edit the first ``T`` records of CounterFact train as one stream, resuming from ``out``; return the results of
    every checkpoint (earlier ones are read back; with ``rescore``, the one the saved adapter holds is scored again)."""
    torch.set_num_threads(1)  # one process per core: the protocol's per-edit times and latencies are one thread's
    torch.manual_seed(settings["seed"])
    requests = requests_for("counterfact-train", T)
    base, tokenizer = load_base(cache)
    adapter = out / "adapter"
    routing = {}
    if has_checkpoint(adapter):  # a resumed stream keeps the routing it started with, even if the defaults moved on
        saved = LEMoEConfig.from_pretrained(str(adapter))
        routing = {name: getattr(saved, name) for name in ROUTING}
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM", **routing))
    editor = LEMoEEditor(model, tokenizer, **settings)
    results = []
    for end in range(CHUNK, T + CHUNK, CHUNK):
        chunk = requests[end - CHUNK : min(end, T)]
        editor.edit(chunk, checkpoint_dir=str(adapter), checkpoint_every=10)
        done = requests[: min(end, T)]
        if len(done) in checkpoints_for(T):
            path = out / f"lemoe-T{len(done)}.json"
            held = sum(len(batch["requests"]) for batch in editor.config.edit_log)
            if rescore and held == len(done):  # only the latest checkpoint's adapter is kept
                path.unlink(missing_ok=True)
            if not path.exists():
                write_json_atomic(path, _checkpoint_result(model, tokenizer, done, adapter, cache, settings, T))
            results.append(json.loads(path.read_text()))
            print(f"T={len(done)}: {results[-1]['after_stream']}", flush=True)
    return results


def write_report(results: list[dict], out: Path) -> None:
    """``report.md`` and ``stream.png`` (each figure against T) from the checkpoints' results."""
    lines = [
        "### counterfact-train: one stream of 10,000 edits (LEMoE)",
        "",
        "At each checkpoint, scored on the edits made so far: teacher-forced (tf) on all of them, generated (gen) on "
        f"a fixed random sample of {GENERATION_SAMPLE}. s/edit: the logged edit time of the last slice of {CHUNK} "
        "edits; latency: 32-token forward, batch 1, LEMoE / base, interleaved in one process. Loc, unedited facts: the "
        "locality probes that ask no fact edited in the stream so far (a CounterFact neighbour can be another edit's "
        "subject in the same relation).",
        "",
        "| T | Rel (gen) | Gen (gen) | Loc (gen) | Rel (tf) | Gen (tf) | Loc (tf) | Loc, unedited facts (gen) | Loc, "
        "unedited facts (tf) | s/edit (last slice) | latency ratio (generic / edited) | adapter KB/edit | load s | "
        "peak MB |",
        "|---:|" + "---:|" * 13,
    ]
    for r in results:
        metrics = r["after_stream"]
        ratios = " / ".join(f"{row['ratio']:.3f}" for row in r["latency"])
        cells = " | ".join(f"{metrics[m]:.3f}" if m in metrics else "–" for m in METRICS)
        lines.append(
            f"| {r['protocol']['T']} | {cells} | {r['seconds_per_edit_by_slice'][-1]:.3f} | {ratios} | "
            f"{r['adapter_bytes_per_edit'] / 1024:.1f} | {r['adapter_load_seconds']:.1f} | {r['peak_memory_mb']:.0f} |"
        )
    if results:
        slices = results[-1]["seconds_per_edit_by_slice"]
        lines += ["", "Seconds per edit by slice of 1,000 edits: " + ", ".join(f"{s:.3f}" for s in slices)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(results, out / "stream.png")


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return
    Ts = [r["protocol"]["T"] for r in results]
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for metric in METRICS:
        style = "-" if metric.endswith("_gen_acc") else "--"
        axes[0].plot(Ts, [r["after_stream"].get(metric) for r in results], style, marker="o", label=metric)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title("quality on the edits so far")
    axes[0].legend(fontsize=7)
    slices = results[-1]["seconds_per_edit_by_slice"]
    axes[1].bar([CHUNK * (i + 0.5) for i in range(len(slices))], slices, width=CHUNK * 0.8)
    axes[1].set_title(f"s/edit per slice of {CHUNK}")
    for index, name in enumerate(("generic text", "edited prompt")):
        axes[2].plot(Ts, [r["latency"][index]["ratio"] for r in results], marker="o", label=name)
    axes[2].axhline(1.05, color="grey", linestyle=":", label="1.05x target")
    axes[2].set_title("latency / base (32 tokens)")
    axes[2].legend(fontsize=7)
    axes[3].plot(Ts, [r["adapter_bytes_per_edit"] / 1024 for r in results], marker="o")
    axes[3].axhline(16, color="grey", linestyle=":", label="16 KiB target")
    axes[3].set_title("adapter KiB per edit")
    axes[3].legend(fontsize=7)
    for axis in axes:
        axis.set_xlabel("edits so far (T)")
        axis.grid(alpha=0.3)
    figure.suptitle("10,000 edits of CounterFact train, SmolLM2-135M-Instruct, one thread")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
