"""How the baselines' learning rates were chosen: a small grid on held-out data (ZsRE test-all from KnowEdit, not the
evaluation slice), T = 100, everything else as in the benchmark. Prints the after-stream metrics per setting.

    python -m benchmarks.tune
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lemoe_peft.edit_log import write_json_atomic

from .lifelong import SETTINGS
from .methods import METHODS
from .run import run

GRID = {
    "FT-L": [1e-4, 1e-3, 1e-2],
    "LoRA": [1e-3, 1e-2, 3e-2],
    "MoE adaptor": [1e-3, 1e-2, 3e-2],
    "LEMoE w/o KV routing": [1e-2, 3e-2],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "tuning-grid.json")
    args = parser.parse_args()
    cache = Path("bench-results") / "cache" / "smollm2-f32"
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(r["method"], r["learning_rate"]) for r in rows}
    for method, rates in GRID.items():
        for rate in rates:
            if (method, rate) in done:
                continue
            METHODS[method].learning_rate = rate
            result = run(method, args.dataset, args.T, SETTINGS, cache, None, tuning=True)
            rows.append(
                {"method": method, "learning_rate": rate, **result["after_stream"], "mean": result["mean_after_stream"]}
            )
            write_json_atomic(args.out, rows)
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
