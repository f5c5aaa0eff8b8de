"""Looking inside a LEMoE adapter: what it holds, and which expert answers a prompt."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from .config import LEMoEConfig
from .hub import target_module_names
from .models import input_device


def describe_adapter(config: LEMoEConfig) -> dict[str, Any]:
    """A summary of an adapter: where it sits, its experts and anchors, and the edits each expert holds."""
    experts = [
        {
            "expert": batch["expert"],
            "edits": len(batch["requests"]),
            "time": batch.get("time"),
            "examples": [f"{r['prompt']} -> {r['target_new']}" for r in batch["requests"][:3]],
        }
        for batch in config.edit_log
    ]
    return {
        "base_model": config.base_model_name_or_path,
        "target_modules": target_module_names(config.target_modules),
        "layers": config.layers_to_transform,
        "num_experts": config.num_experts,
        "num_anchors": config.num_anchors,
        "num_edits": sum(e["edits"] for e in experts),
        "experts": experts,
    }


@torch.no_grad()
def which_expert(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompt: str, adapter_name: str | None = None
) -> dict[str, Any]:
    """Route ``prompt`` and report, per LEMoE layer, the expert chosen at its last token with its best anchor score
    and the best score of any anchor, subject gate aside (``nearest_anchor``), plus the logged edit that holds this
    exact prompt, if any."""
    tuner = model.base_model
    name = tuner.resolve_adapter(adapter_name)
    tokens = tokenizer(prompt, return_tensors="pt").to(input_device(model))
    with tuner.capture_layer_inputs() as captured, model.disable_adapter():
        model(**tokens, use_cache=False)
    layers = {}
    for layer_name, layer in tuner.lemoe_layers(name).items():
        inputs = captured[layer_name]
        experts, _ = layer.route_sequences(name, *inputs)
        chosen = int(experts[0, -1, 0]) if experts.numel() else -1
        scores = layer.anchor_scores(name, *inputs)[0, -1]
        query = layer.route_queries(name, layer.pooled_queries(name, *inputs)[0, -1])
        ungated = query @ layer.lemoe_keys[name].float().T
        owner = layer.lemoe_key_expert[name]
        layers[layer_name] = {
            "expert": chosen if chosen >= 0 else None,
            "score": float(scores[owner == chosen].max()) if chosen >= 0 else None,
            "nearest_anchor": float(ungated.max()) if ungated.numel() else None,
        }
    holders = [
        batch["expert"]
        for batch in model.peft_config[name].edit_log
        for request in batch["requests"]
        if request["prompt"] == prompt
    ]
    return {
        "prompt": prompt,
        "layers": layers,
        "edited_in_expert": Counter(holders).most_common(1)[0][0] if holders else None,
    }
