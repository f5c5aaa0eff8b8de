"""Inference latency of a LEMoE model relative to its base model, measured in the same process, interleaved."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from statistics import median

import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import LEMoEConfig
from lemoe_peft.editor import calibration_texts

from .data import load_base


def _timed(model, input_ids) -> float:
    with torch.no_grad():
        started = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        return time.perf_counter() - started


def measure(cache: Path, adapters: dict[int, Path | None], prompt: str, tokens: int = 32, rounds: int = 40) -> list:
    """Median latency of a ``tokens``-token forward, base vs LEMoE, for each {experts: adapter folder or None}.

    Two inputs: generic text (routed to no expert) and ``prompt`` (an edited fact, routed to one)."""
    base, tokenizer = load_base(cache)
    generic = tokenizer(" ".join(calibration_texts()), return_tensors="pt").input_ids[:, :tokens]
    edited = tokenizer(" ".join([prompt] * tokens), return_tensors="pt").input_ids[:, :tokens]
    rows = []
    for experts, folder in sorted(adapters.items()):
        copy_of_base = copy.deepcopy(base)
        if folder is None:
            model = get_peft_model(copy_of_base, LEMoEConfig(task_type="CAUSAL_LM"))
        else:
            model = PeftModel.from_pretrained(copy_of_base, folder)
        assert model.peft_config["default"].num_experts == experts, (folder, experts)
        for name, input_ids in (("generic text", generic), ("edited prompt", edited)):
            for _ in range(3):  # warm-up
                _timed(base, input_ids), _timed(model, input_ids)
            base_times, model_times = [], []
            for _ in range(rounds):
                base_times.append(_timed(base, input_ids))
                model_times.append(_timed(model, input_ids))
            rows.append(
                {
                    "experts": experts,
                    "anchors": model.peft_config["default"].num_anchors,
                    "input": name,
                    "base_ms": 1000 * median(base_times),
                    "lemoe_ms": 1000 * median(model_times),
                    "ratio": median(model_times) / median(base_times),
                }
            )
        del model
    return rows
