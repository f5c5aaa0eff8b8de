"""The lifelong-editing benchmark: for each data set, stream length T and method, edit the first T requests one
batch after another, then score every request after the whole stream (and, as a second table, right after its
own batch). All methods share the model, data, layer, step budget and evaluation; each run is its own process.

    python -m benchmarks.lifelong --dataset zsre counterfact --T 1 10 100 1000
    python -m benchmarks.lifelong --quick      # a few minutes: T = 1 and 10, 10 steps per batch
    python -m benchmarks.lifelong --dataset counterfact-train --T 10000   # one long stream, LEMoE, resumable
    python -m benchmarks.lifelong --dataset counterfact-train --T 10000 --rescore   # score its last checkpoint again
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lemoe_peft.edit_log import write_json_atomic

from . import latency, report, stream
from .data import CACHE, DATASETS, STREAMS, requests_for
from .methods import METHODS, QUICK_SETTINGS, SETTINGS


def slug(name: str) -> str:
    return name.lower().replace("/", "").replace(" ", "-")


def run_one(method: str, dataset: str, T: int, settings: dict, out: Path, cache: Path, tuning: bool) -> dict:
    path = out / dataset / f"{slug(method)}-T{T}.json"
    if not path.exists():
        command = [
            sys.executable, "-m", "benchmarks.run", "--method", method, "--dataset", dataset, "--T", str(T),
            "--settings", json.dumps(settings), "--cache", str(cache), "--out", str(path),
        ]  # fmt: skip
        if method == "LEMoE":
            command += ["--save-adapter", str(out / dataset / "adapters" / f"lemoe-T{T}")]
        if tuning:
            command.append("--tuning")
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[1])
        print(f"    ({time.perf_counter() - started:.0f} s)", flush=True)
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", default=sorted(DATASETS), choices=sorted(DATASETS) + sorted(STREAMS))
    parser.add_argument("--T", nargs="+", type=int, default=[1, 10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="T = 1 and 10 with 10 steps per batch (minutes)")
    parser.add_argument("--tuning", action="store_true", help="run on the held-out tuning data instead")
    parser.add_argument("--out", type=Path, help="results folder (default: bench-results/, or bench-results/quick)")
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--rescore", action="store_true", help="a long stream: score its saved adapter again")
    args = parser.parse_args()

    settings = QUICK_SETTINGS if args.quick else SETTINGS
    if set(args.dataset) & set(STREAMS):
        if len(args.dataset) > 1 or len(args.T) > 1:
            parser.error("a long stream runs alone: --dataset counterfact-train --T N")
        out = args.out or Path("bench-results") / "stream" / args.dataset[0]
        results = stream.run(args.T[0], settings, CACHE, out, args.rescore)
        stream.write_report(results, out)
        print(f"\nReport: {out / 'report.md'}")
        return
    Ts = [1, 10] if args.quick else args.T
    out = args.out or Path("bench-results") / ("quick" if args.quick else "tuning" if args.tuning else "full")
    results = {}
    for dataset in args.dataset:
        for T in Ts:
            for method in args.methods:
                print(f"{dataset} T={T} {method}", flush=True)
                result = run_one(method, dataset, T, settings, out, CACHE, args.tuning)
                results[(dataset, T, method)] = result
                shown = " ".join(f"{k.removesuffix('_acc')} {v:.3f}" for k, v in result["after_stream"].items())
                print(f"    {shown}  {result['seconds_per_edit']:.2f} s/edit", flush=True)

    if not args.no_latency and "zsre" in args.dataset and "LEMoE" in args.methods and not args.tuning:
        adapters = {0: None}
        for T in Ts:
            folder = out / "zsre" / "adapters" / f"lemoe-T{T}"
            if folder.exists():
                adapters[json.loads((folder / "adapter_config.json").read_text())["num_experts"]] = folder
        prompt = requests_for("zsre", 1)[0].prompt
        write_json_atomic(out / "latency.json", latency.measure(CACHE, adapters, prompt))
    report.write(out)
    print(f"\nReport: {out / 'report.md'}")


if __name__ == "__main__":
    main()
