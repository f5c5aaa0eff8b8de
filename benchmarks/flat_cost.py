"""Does the 10,001st edit cost what the first did? The same new edits are made, batch by batch and interleaved in one
process (so both arms see the same machine load), on a model with an empty adapter and on the model that holds the
10,000-edit stream's adapter; then inference latency against the base model is measured with both adapters.

    python -m benchmarks.lifelong --dataset counterfact-train --T 10000    # first: the stream's adapter
    python -m benchmarks.flat_cost --out benchmarks/results/scale/flat_cost.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import LEMoEConfig, LEMoEEditor
from lemoe_peft.edit_log import write_json_atomic

from . import latency
from .data import CACHE, load_base, requests_for
from .edit_time import interleaved_edits
from .methods import SETTINGS
from .stream import ROUTING

STREAM_ADAPTER = Path("bench-results") / "stream" / "counterfact-train" / "adapter"


def _editor(adapter: Path | None, routing: dict) -> LEMoEEditor:
    base, tokenizer = load_base(CACHE)
    if adapter is None:
        model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM", **routing))
    else:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    return LEMoEEditor(model, tokenizer, **SETTINGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=STREAM_ADAPTER, help="the grown adapter (not modified)")
    parser.add_argument("--edits", type=int, default=200, help="new edits made on both models")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "flat_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    saved = LEMoEConfig.from_pretrained(str(args.adapter))
    grown = _editor(args.adapter, {})
    empty = _editor(None, {name: getattr(saved, name) for name in ROUTING})
    requests = requests_for("counterfact", args.edits)  # facts new to both models (the stream edited CounterFact train)
    empty.ensure_calibrated()
    arms = {"empty": empty, "grown": grown}
    edits_before = {name: sum(len(b["requests"]) for b in arms[name].config.edit_log) for name in arms}
    seconds, steps = interleaved_edits(arms, empty.plan(requests))
    per_edit = {name: seconds[name] / len(requests) for name in arms}
    timing = latency.measure(CACHE, {saved.num_experts: args.adapter}, requests[0].prompt)
    result = {
        "protocol": "the same new edits (CounterFact evaluation slice, timing only) made batch by batch on an empty "
        "adapter and on the grown one, interleaved in one process, one thread; bfloat16 training, benchmark settings",
        "edits": len(requests),
        "edits_before": edits_before,
        "seconds_per_edit": per_edit,
        "ratio_grown_to_empty": per_edit["grown"] / per_edit["empty"],
        "mean_steps": {name: sum(s) / len(s) for name, s in steps.items()},
        "latency": timing,
    }
    write_json_atomic(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
