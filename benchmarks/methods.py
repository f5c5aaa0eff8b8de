"""The editing methods compared in the lifelong benchmark. Each edits one batch at a time into the same FFN of the
same base model and is trained by the same loop (:func:`lemoe_peft.training.fit`) with the same step budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lemoe_peft import EditRequest, LEMoEConfig, LEMoEEditor
from lemoe_peft.config import default_layer_index
from lemoe_peft.editor import TRAIN_DTYPES, EditorSettings
from lemoe_peft.replay import LowerLayerReplay
from lemoe_peft.teacher_forcing import encode
from lemoe_peft.training import Objective, fit

from .adaptors import RoutedAdaptor
from .data import load_base, requests_for

EDITOR_FIELDS = {f.name for f in dataclasses.fields(EditorSettings)}
CONFIG_FIELDS = {f.name for f in dataclasses.fields(LEMoEConfig)}
# the settings every method shares in the lifelong benchmark (benchmarks.run takes changes to them); bfloat16
# training: the same held-out quality as float32 and about twice as fast (BENCHMARKS, round 3)
SETTINGS = {
    "batch_size": 2, "max_steps": 60, "learning_rate": 3e-2, "early_stop_loss": 0.02, "seed": 0,
    "train_dtype": "bfloat16",
}  # fmt: skip
QUICK_SETTINGS = {**SETTINGS, "max_steps": 10}
BASELINE_BATCH_SIZE = 10  # the baselines' stream arrives in batches of 10 edits (as in every round)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Method:
    """Edits batches into ``base``; ``model`` is what gets evaluated."""

    name = "method"
    learning_rate: float | None = None  # the method's own, tuned on held-out data; None: the shared setting
    batch_size: int | None = None  # the method's own edits per training batch; None: the shared setting
    padding_safe = True  # left-padded batched generation gives the tokens of one prompt at a time

    def __init__(self, base: nn.Module, tokenizer, settings: dict[str, Any]) -> None:
        self.base, self.tokenizer = base, tokenizer
        base.requires_grad_(False)  # each method un-freezes exactly what it trains
        own = {"learning_rate": self.learning_rate, "batch_size": self.batch_size}
        self.settings = {**settings, **{k: v for k, v in own.items() if v is not None}}
        layer = default_layer_index(base.config.to_dict(), LEMoEConfig().layer_depth)  # LEMoE's default layer
        self.module_name = f"model.layers.{layer}.mlp.down_proj"
        self.model: nn.Module = base

    def plan(self, requests: Sequence[EditRequest]) -> list[list[EditRequest]]:
        size = self.settings["batch_size"]
        return [list(requests[i : i + size]) for i in range(0, len(requests), size)]

    def edit_batch(self, requests: Sequence[EditRequest]) -> None:
        self._fit(self.trainable(), requests)

    def trainable(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def adapter_bytes(self) -> int:
        """Bytes of state the method adds to (or changes in) the base model."""
        return tensor_bytes(self.trainable())

    def _fit(self, tensors: list[torch.Tensor], requests: Sequence[EditRequest]) -> None:
        batch = encode(self.tokenizer, [(r.prompt, r.target_new) for r in requests])
        replay = LowerLayerReplay(self.base, [self.module_name])
        with torch.no_grad(), replay.record():
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        fit(
            self.model,
            tensors,
            Objective(batch),
            max_steps=self.settings["max_steps"],
            learning_rate=self.settings["learning_rate"],
            early_stop_loss=self.settings["early_stop_loss"],
            replay=replay.replay,
            autocast_dtype=TRAIN_DTYPES[self.settings.get("train_dtype", "float32")],
        )
        for tensor in tensors:
            tensor.requires_grad_(False)


class FineTuneFFN(Method):
    """FT-L: sequential fine-tuning of the FFN output projection's weight (the paper's baseline)."""

    name = "FT-L"
    learning_rate = 1e-3
    batch_size = BASELINE_BATCH_SIZE

    def trainable(self):
        return [self.base.get_submodule(self.module_name).weight]


class LoRA(Method):
    """A PEFT LoRA adapter (rank 16) on the same projection, trained on every batch in turn."""

    name = "LoRA"
    learning_rate = 1e-3
    batch_size = BASELINE_BATCH_SIZE

    def __init__(self, base, tokenizer, settings) -> None:
        super().__init__(base, tokenizer, settings)
        config = LoraConfig(target_modules=[self.module_name], r=16, lora_alpha=16, lora_dropout=0.0)
        self.model = get_peft_model(base, config)

    def trainable(self):
        return [p for n, p in self.model.named_parameters() if "lora_" in n]


class ConventionalMoE(Method):
    """The paper's starting point: 8 experts beside the FFN, a learned softmax token router, everything trainable."""

    name = "MoE adaptor"
    learning_rate = 1e-2
    batch_size = BASELINE_BATCH_SIZE
    num_experts = 8

    def __init__(self, base, tokenizer, settings) -> None:
        super().__init__(base, tokenizer, settings)
        parent_name, child = self.module_name.rsplit(".", 1)
        parent = base.get_submodule(parent_name)
        self.adaptor = RoutedAdaptor(getattr(parent, child), rank=16, pooling="token")
        setattr(parent, child, self.adaptor)
        for _ in range(self.num_experts):
            self.adaptor.add_expert()

    def trainable(self):
        return [*self.adaptor.experts_in, *self.adaptor.experts_out, *self.adaptor.keys]


class LEMoE(Method):
    """lemoe-peft with its defaults."""

    name = "LEMoE"
    config: dict[str, Any] = {}  # LEMoEConfig fields that differ from the defaults (settings may add more)

    def __init__(self, base, tokenizer, settings, **overrides: Any) -> None:
        super().__init__(base, tokenizer, settings)
        config = {**self.config, **{k: v for k, v in self.settings.items() if k in CONFIG_FIELDS}}
        self.model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM", **config))
        options = {k: v for k, v in self.settings.items() if k in EDITOR_FIELDS}
        self.editor = self.editor_class(self.model, tokenizer, **{**options, **overrides})
        self.editor.ensure_calibrated()

    editor_class = LEMoEEditor

    def plan(self, requests):
        return self.editor.plan(requests)

    def edit_batch(self, requests):
        self.editor.edit_batch(requests)

    def adapter_bytes(self) -> int:
        return tensor_bytes(t for k, t in self.model.state_dict().items() if ".lemoe_" in k)


def held_out_lemoe(
    dataset: str,
    T: int,
    settings: dict[str, Any],
    cache: Path,
) -> tuple[LEMoE, Any, list[EditRequest], list[int]]:
    """LEMoE with ``settings`` after editing the first ``T`` held-out requests of ``dataset`` in its planned batches:
    the method, the tokenizer, the requests and the expert each request went into."""
    torch.manual_seed(settings["seed"])
    base, tokenizer = load_base(cache)
    requests = requests_for(dataset, T, tuning=True)
    method = LEMoE(base, tokenizer, settings)
    expert_of = {}
    for expert, batch in enumerate(method.plan(requests)):
        method.edit_batch(batch)
        expert_of |= {id(r): expert for r in batch}
    return method, tokenizer, requests, [expert_of[id(r)] for r in requests]


class LEMoEPlanned(LEMoE):
    """LEMoE with the paper's clustering-based order planning (the default edits in arrival order)."""

    name = "LEMoE with planning"

    def __init__(self, base, tokenizer, settings) -> None:
        super().__init__(base, tokenizer, settings, plan_order=True)


class LEMoENoSubjectGate(LEMoE):
    """LEMoE whose anchors are not gated by their edits' subjects (the routing of earlier releases)."""

    name = "LEMoE w/o subject gate"
    config = {"route_subject_threshold": None}


class LEMoEThreshold06(LEMoE):
    """LEMoE with the anchor threshold that held-out CounterFact prefers (0.6; the default 0.5 suits ZsRE)."""

    name = "LEMoE threshold 0.6"

    def __init__(self, base, tokenizer, settings) -> None:
        super().__init__(base, tokenizer, settings, anchor_threshold=0.6)


class _UnfrozenEditor(LEMoEEditor):
    def trainable_tensors(self):
        layers = self.tuner.lemoe_layers(self.adapter).values()
        frozen = [
            t for layer in layers for t in (layer.lemoe_frozen_A[self.adapter], layer.lemoe_frozen_B[self.adapter])
        ]
        return [*super().trainable_tensors(), *(t for t in frozen if t.numel())]


class LEMoENoFreezing(LEMoE):
    """Module insertion and anchors as usual, but every earlier expert stays trainable on every batch."""

    name = "LEMoE w/o freezing"
    editor_class = _UnfrozenEditor


class LEMoELearnedRouter(Method):
    """LEMoE without KV anchor routing: one expert per batch, earlier experts and their keys frozen, but a learned
    softmax router (a trainable key per expert on the causal-mean query) instead of anchors, and no fall-through."""

    name = "LEMoE w/o KV routing"
    learning_rate = 1e-2
    # its causal-mean router counts padding tokens (so: one prompt at a time) and, under a KV cache, sees only each
    # generation step's new tokens: its generated answers are what a user of this design would get
    padding_safe = False

    def __init__(self, base, tokenizer, settings) -> None:
        super().__init__(base, tokenizer, settings)
        parent_name, child = self.module_name.rsplit(".", 1)
        parent = base.get_submodule(parent_name)
        self.adaptor = RoutedAdaptor(getattr(parent, child), rank=LEMoEConfig().expert_rank, pooling="causal_mean")
        setattr(parent, child, self.adaptor)
        self._newest: list[torch.Tensor] = []

    def edit_batch(self, requests):
        self._newest = self.adaptor.add_expert()
        self._fit(self._newest, requests)

    def trainable(self):
        return self._newest

    def adapter_bytes(self) -> int:
        return tensor_bytes(self.adaptor.parameters()) - tensor_bytes(self.adaptor.base.parameters())


METHODS = {
    method.name: method
    for method in (
        *(LEMoE, FineTuneFFN, LoRA, ConventionalMoE),
        *(LEMoEPlanned, LEMoELearnedRouter, LEMoENoFreezing, LEMoEThreshold06, LEMoENoSubjectGate),
    )
}
