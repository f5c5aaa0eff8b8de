"""Tables (Markdown) and a plot (PNG) from the JSON results of a benchmark folder."""

from __future__ import annotations

import json
from pathlib import Path

LABELS = {"rewrite_acc": "Rel", "rephrase_acc": "Gen", "locality_acc": "Loc"}
# generation-based metrics first: what greedy generate() answers; older results have none ("–")
FAMILIES = {"generated": ("rewrite_gen_acc", "rephrase_gen_acc", "locality_gen_acc"), "teacher-forced": tuple(LABELS)}


def _load(out: Path) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*/*.json")):
        result = json.loads(path.read_text())
        results.setdefault(result["protocol"]["dataset"], []).append(result)
    return results


def _cells(metrics: dict[str, float], names: tuple[str, ...]) -> list[str]:
    """The metrics and their mean (bold), "–" where a result lacks them."""
    values = [metrics.get(name) for name in names]
    mean = sum(values) / len(values) if None not in values else None
    cells = ["–" if v is None else f"{v:.3f}" for v in values]
    return [*cells, "–" if mean is None else f"**{mean:.3f}**"]


def _table(rows: list[dict], key: str, families: tuple[str, ...] = tuple(FAMILIES)) -> list[str]:
    tag = {"generated": "gen", "teacher-forced": "tf"}
    metric_headers = [f"{h} ({tag[f]})" for f in families for h in (*LABELS.values(), "mean")]
    lines = [
        "| method | T | " + " | ".join(metric_headers) + " | s/edit | peak MB | adapter KB/edit |",
        "|---|---:|" + "---:|" * len(metric_headers) + "---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["protocol"]["T"], _order(r))):
        cells = [cell for family in families for cell in _cells(r[key], FAMILIES[family])]
        lines.append(
            f"| {r['protocol']['method']} | {r['protocol']['T']} | "
            + " | ".join(cells)
            + f" | {r['seconds_per_edit']:.2f} | {r['peak_memory_mb']:.0f} | "
            f"{r['adapter_bytes_per_edit'] / 1024:.1f} |"
        )
    return lines


def _order(result: dict) -> int:
    from .methods import METHODS

    return list(METHODS).index(result["protocol"]["method"])


def _plot(dataset: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(FAMILIES), 3, figsize=(13, 7), sharey=True, squeeze=False)
    methods = sorted({r["protocol"]["method"] for r in rows}, key=lambda m: _order({"protocol": {"method": m}}))
    for row, (family, metrics) in zip(axes, FAMILIES.items(), strict=True):  # generated on top
        for axis, metric, label in zip(row, metrics, LABELS.values(), strict=True):
            for method in methods:
                points = sorted(
                    (r["protocol"]["T"], r["after_stream"][metric])
                    for r in rows
                    if r["protocol"]["method"] == method and metric in r["after_stream"]
                )
                style = {"linewidth": 2.5} if method == "LEMoE" else {"linewidth": 1.2, "alpha": 0.8}
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o", label=method, **style)
            axis.set_xscale("log")
            axis.set_title(f"{label}, {family} ({metric})")
            axis.grid(alpha=0.3)
        row[0].set_ylabel("after the whole stream")
    for axis in axes[-1]:
        axis.set_xlabel("stream length T")
    axes[0][0].set_ylim(-0.02, 1.02)
    figure.legend(*axes[-1][0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle(f"Lifelong editing on {dataset}, SmolLM2-135M-Instruct")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out: Path) -> None:
    lines = []
    for dataset, rows in _load(out).items():
        protocol = rows[0]["protocol"]
        lines += [
            f"### {dataset}: {protocol['data'].split(',')[0]}",
            "",
            "After the whole stream of T edits (the lifelong protocol). gen: greedy `generate()` answers with the "
            "target (Rel, Gen) or continues locality prompts as the unedited model does (Loc); tf: teacher-forced "
            "token accuracy (EasyEdit's metrics):",
            "",
            *_table(rows, "after_stream"),
            "",
            "Right after each edit's own batch (hides forgetting; for comparison only; teacher-forced):",
            "",
            *_table(rows, "after_each_batch", ("teacher-forced",)),
            "",
        ]
        _plot(dataset, rows, out / f"{dataset}.png")
    latency_path = out / "latency.json"
    if latency_path.exists():
        lines += [
            "### Inference latency (32-token forward, batch 1)",
            "",
            "| experts | anchors | input | base ms | LEMoE ms | ratio |",
            "|---:|---:|---|---:|---:|---:|",
        ]
        for row in json.loads(latency_path.read_text()):
            lines.append(
                f"| {row['experts']} | {row['anchors']} | {row['input']} | {row['base_ms']:.1f} | "
                f"{row['lemoe_ms']:.1f} | {row['ratio']:.3f} |"
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")
