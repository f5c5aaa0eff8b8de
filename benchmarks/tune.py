"""How the settings were chosen: small grids on held-out data (KnowEdit's ZsRE test-all and CounterFact's train
split, never the evaluation slices), T = 100, everything else as in the benchmark. Each row records the
after-stream metrics; results accumulate in (and resume from) the output file.

    python -m benchmarks.tune                       # baselines' learning rates, on ZsRE
    python -m benchmarks.tune --lemoe --dataset zsre counterfact
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lemoe_peft.edit_log import write_json_atomic

from .data import CACHE
from .methods import METHODS, SETTINGS
from .run import run

BASELINE_GRID = [
    *[("FT-L", {"learning_rate": lr}) for lr in (1e-4, 1e-3, 1e-2)],
    *[("LoRA", {"learning_rate": lr}) for lr in (1e-4, 3e-4, 1e-3, 1e-2, 3e-2)],
    *[("MoE adaptor", {"learning_rate": lr}) for lr in (1e-3, 1e-2, 3e-2)],
    *[("LEMoE w/o KV routing", {"learning_rate": lr}) for lr in (1e-2, 3e-2)],
]
LEMOE_GRID = [
    *[("LEMoE", {"learning_rate": lr}) for lr in (1e-2, 3e-2, 1e-1)],
    *[("LEMoE", {"preserve_weight": w}) for w in (0.0, 3.0)],
    *[("LEMoE", {"anchor_threshold": t}) for t in (0.4, 0.6)],
    *[("LEMoE", {"batch_size": b}) for b in (5, 20)],
    ("LEMoE", {"plan_order": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--dataset", nargs="+", default=["zsre"])
    parser.add_argument("--lemoe", action="store_true", help="LEMoE's own settings instead of the baselines'")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "tuning-grid.json")
    args = parser.parse_args()
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["dataset"], r["method"], json.dumps(r["overrides"])) for r in rows}
    for dataset in args.dataset:
        for method, overrides in LEMOE_GRID if args.lemoe else BASELINE_GRID:
            if (dataset, method, json.dumps(overrides)) in done:
                continue
            cls = METHODS[method]
            default_rate, cls.learning_rate = cls.learning_rate, overrides.get("learning_rate", cls.learning_rate)
            try:
                result = run(method, dataset, args.T, {**SETTINGS, **overrides}, CACHE, None, tuning=True)
            finally:
                cls.learning_rate = default_rate
            rows.append(
                {
                    "dataset": dataset,
                    "method": method,
                    "overrides": overrides,
                    **result["after_stream"],
                    "mean": result["mean_after_stream"],
                    "seconds_per_edit": result["seconds_per_edit"],
                }
            )
            write_json_atomic(args.out, rows)
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
