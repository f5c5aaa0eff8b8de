"""Cost per operation as a LEMoE adapter grows: ``add_expert``, ``add_anchors``, one routed forward and
``save_pretrained`` at T edits (10 edits per expert, 3 anchor keys per edit, one subject key per edit gating its
anchors, as the editor makes them), each as a ratio to the first T of the same run. A stream that stays flat per edit
keeps the first two near 1; a save writes every tensor, so it grows linearly with T; a forward scores every subject
key and the anchor keys of the subjects a text names (here none: random keys), so it grows at most linearly.

The layer has SmolLM2-135M's widths (d_in 1536, d_out 576, rank 16) in a 2-layer model with random weights, so the
storage is realistic and the model itself costs little. ``--before DIR`` measures another checkout of the library
in the same run, each implementation in its own process with one thread:

    git archive a18406d lemoe_peft | tar -x -C /tmp/before     # the library before amortized growth
    python -m benchmarks.growth --before /tmp/before --before-label a18406d   # benchmarks/results/growth.{json,png}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

EDITS_PER_EXPERT = 10
ANCHORS_PER_EDIT = 3
MODEL = {
    "vocab_size": 256,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 2,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
OPERATIONS = ("add_expert", "add_anchors", "forward", "save_pretrained")


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def _new_model():
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lemoe_peft import LEMoEConfig

    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **MODEL)).eval()
    return get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM", expert_rank=16))


def _grow(model, edits: int, costs: dict[str, list[float]]) -> None:
    """Add ``edits`` edits' experts and (random, unit-norm) anchor keys, appending each call's seconds to ``costs``.
    Libraries with subject gates get one subject key per edit gating its anchors, as the editor gives them."""
    tuner = model.base_model
    ((layer_name, layer),) = tuner.lemoe_layers().items()
    width = layer.lemoe_keys["default"].shape[1]
    gated = hasattr(layer, "lemoe_subjects")
    for _ in range(edits // EDITS_PER_EXPERT):
        started = time.perf_counter()
        expert = tuner.add_expert()
        costs["add_expert"].append(time.perf_counter() - started)
        keys = torch.randn(EDITS_PER_EXPERT * ANCHORS_PER_EDIT, width)
        keys = {layer_name: torch.nn.functional.normalize(keys)}
        subjects = {}
        if gated:
            subject_width = layer.lemoe_subjects["default"].shape[1]
            subject_keys = torch.nn.functional.normalize(torch.randn(EDITS_PER_EXPERT, subject_width))
            subjects = {
                "subjects": {layer_name: subject_keys},
                "key_subject": torch.arange(EDITS_PER_EXPERT).repeat_interleave(ANCHORS_PER_EDIT),
            }
        started = time.perf_counter()
        tuner.add_anchors(expert, keys, threshold=0.0, **subjects)  # threshold 0: every key scored is a candidate
        costs["add_anchors"].append(time.perf_counter() - started)


@torch.no_grad()
def measure(checkpoints: list[int]) -> list[dict]:
    """Grow one adapter edit batch by edit batch up to the largest T (after a warm-up on another adapter); at each T
    in ``checkpoints``, record the mean cost of the additions since the previous T (amortized: reallocations
    included) and the median forward and save."""
    import lemoe_peft

    torch.manual_seed(0)
    _grow(_new_model(), 100, {"add_expert": [], "add_anchors": []})  # warm-up: first calls, allocator
    model = _new_model()
    probe = torch.randint(256, (1, 32), generator=torch.Generator().manual_seed(1))
    rows, edits = [], 0
    with tempfile.TemporaryDirectory() as folder:
        for T in checkpoints:
            costs: dict[str, list[float]] = {"add_expert": [], "add_anchors": []}
            _grow(model, T - edits, costs)
            edits = T
            forward = [_timed(lambda: model(input_ids=probe, use_cache=False)) for _ in range(9)]
            save = [_timed(lambda: model.save_pretrained(folder)) for _ in range(3)]
            config = model.peft_config["default"]
            rows.append(
                {
                    "T": T,
                    "experts": config.num_experts,
                    "anchors": config.num_anchors,
                    **{op: statistics.mean(times) for op, times in costs.items()},
                    **{f"{op}_median": statistics.median(times) for op, times in costs.items()},
                    "forward": statistics.median(forward),
                    "save_pretrained": statistics.median(save),
                    "adapter_bytes": (Path(folder) / "adapter_model.safetensors").stat().st_size,
                }
            )
    for row in rows:
        row["ratio"] = {op: row[op] / rows[0][op] for op in OPERATIONS}
    rows.append({"library": str(Path(lemoe_peft.__file__).parent)})
    return rows


def _run(library: Path, checkpoints: list[int]) -> dict:
    """``measure`` in a fresh single-threaded process that imports ``lemoe_peft`` from ``library``."""
    env = {**os.environ, "PYTHONPATH": str(library.resolve()), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--measure", *map(str, checkpoints)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=library).stdout
    *rows, source = json.loads(output)
    return {"library": source["library"], "rows": rows}


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(OPERATIONS), figsize=(14, 3.6), sharex=True)
    for axis, operation in zip(axes, OPERATIONS, strict=True):
        for label, result in results.items():
            points = [(row["T"], row["ratio"][operation]) for row in result["rows"]]
            axis.plot(*zip(*points, strict=True), marker="o", label=label)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(f"{operation}: cost / cost at T={points[0][0]}", fontsize=9)
        axis.set_xlabel("edits T")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("T", nargs="*", type=int, default=[100, 1000, 5000, 10000])
    parser.add_argument("--before", type=Path, help="another checkout of the library to measure in the same run")
    parser.add_argument("--before-label", default="before", help="what --before is, for the results")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        torch.set_num_threads(1)
        json.dump(measure(args.T), sys.stdout)
        return
    root = Path(__file__).resolve().parents[1]
    results = {"after": _run(root, args.T)}
    if args.before is not None:
        results = {"before": {"label": args.before_label, **_run(args.before, args.T)}, **results}
    protocol = {
        "model": MODEL,
        "expert_rank": 16,
        "edits_per_expert": EDITS_PER_EXPERT,
        "anchors_per_edit": ANCHORS_PER_EDIT,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "threads": 1,
        "cost": "seconds; add_*: mean (amortized) and median over the additions since the previous T; forward "
        "(32 tokens): median of 9; save_pretrained: median of 3",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "growth.json").write_text(json.dumps({"protocol": protocol, **results}, indent=1) + "\n")
    _plot(results, args.out / "growth.png")


if __name__ == "__main__":
    main()
