"""Batch editing, as the LEMoE paper and MEMIT-style editors report it: the same T facts edited in one call with large
batches (one expert per batch) against the lifelong stream of batches of 10, same settings otherwise.

    python -m benchmarks.batch_editing --dataset zsre counterfact --T 100 --batch-size 10 100
    python -m benchmarks.batch_editing --T 1000 --batch-size 10 100 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .data import CACHE
from .lifelong import run_one
from .methods import SETTINGS
from .stream import METRICS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=["zsre", "counterfact"])
    parser.add_argument("--T", nargs="+", type=int, default=[100])
    parser.add_argument("--batch-size", nargs="+", type=int, default=[10, 100])
    parser.add_argument("--settings", type=json.loads, default={}, help="JSON overriding the benchmark's settings")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "batch")
    args = parser.parse_args()
    lines = [
        "| data | T | batch size | experts | Rel (gen) | Gen (gen) | Loc (gen) | Rel (tf) | Gen (tf) | Loc (tf) | "
        "Loc other (gen) | Loc other (tf) | s/edit | peak MB | adapter KB/edit |",
        "|---|---:|---:|---:|" + "---:|" * 11,
    ]
    for dataset in args.dataset:
        for T in args.T:
            for size in (s for s in args.batch_size if s <= T):
                settings = {**SETTINGS, **args.settings, "batch_size": size}
                result = run_one("LEMoE", dataset, T, settings, args.out / f"batch{size}", CACHE, tuning=False)
                cells = " | ".join(
                    f"{result['after_stream'][m]:.3f}" if m in result["after_stream"] else "–" for m in METRICS
                )
                lines.append(
                    f"| {dataset} | {T} | {size} | {result['batches']} | {cells} | {result['seconds_per_edit']:.3f} | "
                    f"{result['peak_memory_mb']:.0f} | {result['adapter_bytes_per_edit'] / 1024:.1f} |"
                )
                print(lines[-1], flush=True)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"\nReport: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
