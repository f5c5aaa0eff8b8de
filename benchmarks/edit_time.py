"""Time per edit under two settings (of the editor or the adapter config): the same held-out edits made on two fresh
LEMoE models, a group at a time (each arm in its own batches), interleaved in one process (one thread, the arms
alternating which goes first), so that both see the same machine load. Reports seconds per edit, the ratio, and steps
per batch (a setting can change how fast training converges).

    python -m benchmarks.edit_time --dataset zsre --T 100 --baseline '{"subject_lead": ""}'
    python -m benchmarks.edit_time --dataset zsre --T 100 --baseline '{"route_subject_names": "off"}'
    python -m benchmarks.edit_time --dataset zsre --T 100 --baseline '{"batch_size": 10}'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from peft import get_peft_model

from lemoe_peft import LEMoEConfig, LEMoEEditor
from lemoe_peft.edit_log import write_json_atomic

from .data import CACHE, load_base, requests_for
from .methods import CONFIG_FIELDS, SETTINGS


def interleaved_edits(editors: dict[str, LEMoEEditor], requests: list) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Edit ``requests`` with each editor, a group at a time (as many requests as each arm's batches divide evenly),
    each arm in its own planned batches, alternating which arm goes first (so drift in machine load hits all arms);
    return each editor's total seconds and its steps per batch."""
    size = math.lcm(*(editor.settings.batch_size for editor in editors.values()))
    seconds = dict.fromkeys(editors, 0.0)
    steps: dict[str, list[int]] = {name: [] for name in editors}
    for number, start in enumerate(range(0, len(requests), size)):
        for name in list(editors)[:: 1 if number % 2 == 0 else -1]:
            started = time.perf_counter()
            for batch in editors[name].plan(requests[start : start + size]):
                steps[name].append(editors[name].edit_batch(batch)["steps"])
            seconds[name] += time.perf_counter() - started
    return seconds, steps


def compare(dataset: str, T: int, arms: dict[str, dict], cache: Path) -> dict:
    """Seconds per edit and steps per batch of each arm ({name: settings}) on the first ``T`` held-out edits."""
    torch.set_num_threads(1)
    editors = {}
    for name, settings in arms.items():
        base, tokenizer = load_base(cache)
        config = LEMoEConfig(task_type="CAUSAL_LM", **{k: v for k, v in settings.items() if k in CONFIG_FIELDS})
        editor_settings = {k: v for k, v in settings.items() if k not in CONFIG_FIELDS}
        editors[name] = LEMoEEditor(get_peft_model(base, config), tokenizer, **editor_settings)
        editors[name].ensure_calibrated()
    requests = requests_for(dataset, T, tuning=True)
    seconds, steps = interleaved_edits(editors, requests)
    per_edit = {name: s / len(requests) for name, s in seconds.items()}
    first, second = arms
    return {
        "protocol": f"the first {len(requests)} held-out {dataset} edits, batch by batch on two fresh models, "
        "interleaved in one process, one thread",
        "arms": arms,
        "seconds_per_edit": per_edit,
        f"ratio_{second}_to_{first}": per_edit[second] / per_edit[first],
        "mean_steps": {name: sum(s) / len(s) for name, s in steps.items()},
        "seconds_per_step": {name: seconds[name] / sum(steps[name]) for name in arms},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="zsre")
    parser.add_argument("--T", type=int, default=100)
    parser.add_argument("--baseline", default="{}", help="JSON: settings of the baseline arm")
    parser.add_argument("--candidate", default="{}", help="JSON: settings of the other arm")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "edit_time.json")
    args = parser.parse_args()
    arms = {
        "baseline": {**SETTINGS, **json.loads(args.baseline)},
        "candidate": {**SETTINGS, **json.loads(args.candidate)},
    }
    result = compare(args.dataset, args.T, arms, args.cache)
    write_json_atomic(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))


if __name__ == "__main__":
    main()
