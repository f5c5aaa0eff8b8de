"""The trade-off the held-out settings move along: generated generality against generated locality (on KnowEdit
ZsRE the other-relation probes) of every held-out LEMoE result of one stream length, one panel per data set, each
point named by the settings it changes from the benchmark's, with issue #9's targets for reference. A result's file
does not record the code it ran on: name the files made with today's defaults where older ones sit beside them.

    python -m benchmarks.frontier --T 300      # reads and writes benchmarks/results/heldout/
    python -m benchmarks.frontier --T 100 benchmarks/results/heldout/zsre-T100-{arrival-order,depth*}.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

from .methods import SETTINGS

RESULTS = Path("benchmarks") / "results" / "heldout"
# issue #9's targets: (T, generated Gen, generated Loc)
TARGETS = {"zsre": (100, 0.85, 0.95), "counterfact": (1000, 0.50, 0.90)}
TITLES = {"zsre": "KnowEdit ZsRE test (held-out)", "counterfact": "CounterFact train (held-out)"}
Point = tuple[str, float, float]  # (settings changed, generality, locality)


def points(files: Iterable[Path], T: int) -> dict[str, list[Point]]:
    """Per data set, one point per held-out LEMoE result of stream length ``T`` among ``files``."""
    found: dict[str, list[Point]] = {}
    for path in files:
        result = json.loads(path.read_text(encoding="utf-8"))
        protocol = result.get("protocol", {}) if isinstance(result, dict) else {}
        if protocol.get("T") != T or protocol.get("method") != "LEMoE":
            continue
        changed = {k: v for k, v in protocol["settings"].items() if SETTINGS.get(k) != v}
        label = ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "defaults"
        metrics = result["after_stream"]
        locality = metrics.get("locality_other_gen_acc", metrics["locality_gen_acc"])
        found.setdefault(protocol["dataset"], []).append((label, metrics["rephrase_gen_acc"], locality))
    return found


def plot(found: dict[str, list[Point]], T: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    most = max(map(len, found.values()))
    figure, axes = plt.subplots(1, len(found), figsize=(6.5 * len(found), 5 + 0.2 * most), squeeze=False)
    for axis, (dataset, rows) in zip(axes[0], sorted(found.items(), reverse=True), strict=True):
        for number, (label, generality, locality) in enumerate(rows):
            if label == "defaults":
                style = {"s": 70, "color": "black"}
            else:
                style = {"s": 40, "marker": "os^Dv"[number % 5], "color": plt.cm.tab20(number % 20)}
            axis.scatter(locality, generality, label=label, **style)
        if dataset in TARGETS:
            target_T, generality, locality = TARGETS[dataset]
            axis.scatter(locality, generality, marker="*", s=160, color="tab:red", label=f"#9 target (T={target_T})")
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
        axis.set_title(f"{TITLES.get(dataset, dataset)}, T={T}")
        axis.set_xlabel("locality, generated" + (" (other-relation probes)" if dataset == "zsre" else ""))
        axis.set_ylabel("generality, generated")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=300)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder read (without files) and written")
    parser.add_argument("files", nargs="*", type=Path, help="result files to plot (default: all in --results)")
    args = parser.parse_args()
    found = points(args.files or sorted(args.results.glob("*.json")), args.T)
    if not found:
        raise SystemExit(f"No held-out LEMoE results with T={args.T} among the files read.")
    path = args.results / f"frontier-T{args.T}.png"
    plot(found, args.T, path)
    print(path)


if __name__ == "__main__":
    main()
