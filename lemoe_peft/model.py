"""``LEMoEModel``: the PEFT tuner that inserts LEMoE layers and grows, prunes and routes their experts."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .adapter_file import ADDED_LATER
from .config import DEFAULT_TARGET_MODULES, LEMoEConfig, default_layer_index
from .layer import MERGE_REFUSAL, LEMoELayer, LEMoELinear, offload_execution_device
from .routing import LayerInputs, RoutingDecisions, RoutingSession

logger = logging.getLogger(__name__)

_COUNTED = ("lemoe_frozen_A", "lemoe_keys", "lemoe_subjects", "lemoe_token_marks", "lemoe_A")
_COUNT_FIELDS = ("num_experts", "num_anchors", "num_subjects", "route_vocab_size")


def _canonical_key(key: str) -> str:
    """A LEMoE tensor's key without the ``base_layer`` hops of adapters that wrap the LEMoE layer."""
    return re.sub(r"(\.base_layer)+(?=\.lemoe_)", "", key)


class LEMoEModel(BaseTuner):
    """LEMoE (Wang & Li, EMNLP 2024) as a PEFT tuner: a mixture of low-rank experts beside one FFN, grown one expert
    per batch of edits (module insertion), with KV anchor routing and fall-through to the untouched FFN.

    Use it through ``peft.get_peft_model(model, LEMoEConfig(...))``; the LEMoE-specific operations live here, reached
    as ``peft_model.base_model.add_expert()`` and so on.
    """

    prefix: str = "lemoe_"
    tuner_layer_cls = LEMoELayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    def __init__(self, model: nn.Module, peft_config: Any, adapter_name: str = "default", **kwargs: Any) -> None:
        other = getattr(model, "peft_config", {}).get(adapter_name)
        live = any(isinstance(m, BaseTunerLayer) and not isinstance(m, LEMoELayer) for m in model.modules())
        if other is not None and not isinstance(other, LEMoEConfig) and live:  # (peft 0.18 keeps merged configs)
            raise ValueError(
                f"The model already carries a {other.peft_type} adapter named '{adapter_name}'. Stacked PEFT models "
                "share one table of adapters, so LEMoE would replace its config: give LEMoE another name, e.g. "
                "get_peft_model(model, LEMoEConfig(), adapter_name='edits'), or merge the other adapter first "
                "(merge_and_unload)."
            )
        super().__init__(model, peft_config, adapter_name, **kwargs)
        self._freeze_other_adapters()

    def _freeze_other_adapters(self) -> None:
        """Only LEMoE trains: parameters of other adapters on the model (e.g. a live LoRA) are frozen, so that editing
        cannot change them (peft >= 0.21 keeps existing parameters' trainability when an adapter is added)."""
        others = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and f".{self.prefix}" not in n]
        if others:
            logger.warning(
                "LEMoE froze %d trainable parameters of other adapters (e.g. %s): editing trains LEMoE experts only. "
                "Save the other adapter first, or merge it (merge_and_unload) before adding LEMoE.",
                len(others),
                others[0][0],
            )
            for _, parameter in others:
                parameter.requires_grad_(False)

    # ------------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # PEFT keeps the config object it was given, but a LEMoE config records what its adapter holds (counts, edit
        # log): an adapter whose config object another adapter already uses gets its own copy, so two adapters made
        # from one config object stay independent.
        config = self.peft_config[adapter_name]
        if any(other is config for name, other in self.peft_config.items() if name != adapter_name):
            self.peft_config[adapter_name] = copy.deepcopy(config)
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # through __call__, so the routing hooks on the model run (peft < 0.21 calls model.forward, which skips them)
        return self.model(*args, **kwargs)

    def _pre_injection_hook(self, model: nn.Module, config: LEMoEConfig, adapter_name: str) -> None:
        if hasattr(self, "routing"):
            return
        self.register_load_state_dict_pre_hook(self._load_state_dict_pre_hook)
        existing = next((m.routing_session for m in model.modules() if isinstance(m, LEMoELayer)), None)
        if existing is not None:  # the model already carries LEMoE layers (a second PeftModel on the same base)
            self.routing, self._routing_hooks = existing, []
        else:
            self.routing = RoutingSession()
            self._routing_hooks = self.routing.attach(model)

    def _prepare_adapter_config(self, peft_config: LEMoEConfig, model_config: dict) -> LEMoEConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            if model_type not in self.target_module_mapping:
                raise ValueError(
                    f"LEMoE has no default target for model_type '{model_type}'. Pass `target_modules` (the FFN output "
                    "projection, e.g. ['mlp.down_proj']) and `layers_to_transform` (e.g. [20]) to LEMoEConfig. "
                    f"Models with defaults: {sorted(self.target_module_mapping)}."
                )
            peft_config.target_modules = set(self.target_module_mapping[model_type])
            if peft_config.layers_to_transform is None:
                peft_config.layers_to_transform = [default_layer_index(model_config, peft_config.layer_depth)]
        return peft_config

    def _create_and_replace(
        self,
        config: LEMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, LEMoELayer):
            target.update_layer(adapter_name, config)
            return
        new_module = LEMoELinear(target, adapter_name, config, self.routing)
        self._replace_module(parent, target_name, new_module, target)
        if offload_execution_device(target) is not None:
            # PEFT moved the new adapter to the offloaded base weight's device (meta), which drops its values:
            # build it again, on the device the layer computes on
            new_module.update_layer(adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(MERGE_REFUSAL)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for handle in self._routing_hooks:
            handle.remove()
        self._routing_hooks = []
        return model

    # ---------------------------------------------------------------------------------------------------- layers
    def resolve_adapter(self, adapter_name: str | None) -> str:
        """``adapter_name``, or the first active adapter when None; an unknown name is refused."""
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"No LEMoE adapter named '{name}'; adapters: {list(self.peft_config)}.")
        return name

    def lemoe_layers(self, adapter_name: str | None = None) -> dict[str, LEMoELayer]:
        """The adapter's LEMoE layers by module name, in model order."""
        name = self.resolve_adapter(adapter_name)
        return {
            key: module
            for key, module in self.model.named_modules()
            if isinstance(module, LEMoELayer) and name in module.lemoe_settings
        }

    # ----------------------------------------------------------------------------------------------- the method
    def add_expert(self, adapter_name: str | None = None) -> int:
        """Module insertion: freeze every existing expert and add a new trainable one; return its index.

        The new expert has no anchor keys yet, so nothing is routed to it until :meth:`add_anchors` gives it some.
        """
        name = self.resolve_adapter(adapter_name)
        config = self.peft_config[name]
        indices = {layer.add_expert(name, config.init_weights) for layer in self.lemoe_layers(name).values()}
        config.num_experts += 1
        (index,) = indices
        return index

    def remove_expert(self, expert: int, adapter_name: str | None = None) -> None:
        """Undo one batch of edits: delete expert ``expert`` and its anchors; later experts shift down by one."""
        name = self.resolve_adapter(adapter_name)
        removed = {layer.remove_expert(name, expert) for layer in self.lemoe_layers(name).values()}
        config = self.peft_config[name]
        config.num_experts -= 1
        config.num_anchors -= removed.pop()
        config.num_subjects = next(iter(self.lemoe_layers(name).values())).lemoe_subjects[name].shape[0]
        config.edit_log = [batch for batch in config.edit_log if batch["expert"] != expert]
        for batch in config.edit_log:
            if batch["expert"] > expert:
                batch["expert"] -= 1

    def add_anchors(
        self,
        expert: int,
        keys: dict[str, torch.Tensor],
        threshold: float | torch.Tensor | None = None,
        adapter_name: str | None = None,
        subjects: dict[str, torch.Tensor] | None = None,
        key_subject: torch.Tensor | None = None,
        subject_alias: torch.Tensor | None = None,
        subject_names: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Give ``expert`` anchor keys: ``keys`` maps each LEMoE layer name to (n, d) vectors in query space (see
        :meth:`LEMoELayer.route_queries`); every layer receives the same number n of keys. ``threshold`` is one score
        or one per key. Optionally ``subjects`` maps each layer to (s, d) subject keys (see
        :meth:`LEMoELayer.subject_queries`), ``key_subject`` (n,) names the subject gating each key (-1: none) and
        ``subject_alias`` (s,) the subject each subject key reads (default: its own; several keys can read one) and
        ``subject_names`` the token ids of each subject key's name as its text wrote it (``route_subject_names``)."""
        name = self.resolve_adapter(adapter_name)
        layers = self.lemoe_layers(name)
        if set(keys) != set(layers) or len({k.shape[0] for k in keys.values()}) != 1:
            raise ValueError(f"Give the same number of anchor keys for exactly these layers: {sorted(layers)}.")
        if subjects is not None and (set(subjects) != set(layers) or len({s.shape[0] for s in subjects.values()}) != 1):
            raise ValueError(f"Give the same number of subject keys for exactly these layers: {sorted(layers)}.")
        config = self.peft_config[name]
        threshold_ = self._threshold(config, threshold)
        for layer_name, layer in layers.items():
            layer_subjects = None if subjects is None else subjects[layer_name]
            layer.add_anchors(
                name, expert, keys[layer_name], threshold_, layer_subjects, key_subject, subject_alias, subject_names
            )
        config.num_anchors += next(iter(keys.values())).shape[0]
        config.num_subjects += 0 if subjects is None else next(iter(subjects.values())).shape[0]

    def replace_anchors(
        self,
        expert: int,
        keys: dict[str, torch.Tensor],
        threshold: float | torch.Tensor | None = None,
        adapter_name: str | None = None,
        subjects: dict[str, torch.Tensor] | None = None,
        key_subject: torch.Tensor | None = None,
        subject_alias: torch.Tensor | None = None,
        subject_names: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Swap the anchor (and subject) keys of ``expert`` in the layers named in ``keys`` for new ones, as many as
        before."""
        name = self.resolve_adapter(adapter_name)
        layers = self.lemoe_layers(name)
        for layer_name, new_keys in keys.items():
            layer = layers[layer_name]
            layer_subjects = None if subjects is None else subjects[layer_name]
            if int((layer.lemoe_key_expert[name] == expert).sum()) != new_keys.shape[0] or (
                int((layer.lemoe_subject_expert[name] == expert).sum())
                != (0 if subjects is None else len(layer_subjects))
            ):
                raise ValueError(f"Expert {expert} has a different number of anchors or subjects in {layer_name}.")
            threshold_ = self._threshold(self.peft_config[name], threshold)
            layer.replace_anchors(
                name, expert, new_keys, threshold_, layer_subjects, key_subject, subject_alias, subject_names
            )

    @staticmethod
    def _threshold(config: LEMoEConfig, threshold: float | torch.Tensor | None) -> torch.Tensor:
        return torch.as_tensor(config.route_threshold if threshold is None else threshold, dtype=torch.float32)

    def calibrate_routing(self, samples: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Set each layer's routing whitening from pooled queries of generic text (layer name -> (n, d))."""
        name = self.resolve_adapter(adapter_name)
        for layer_name, layer in self.lemoe_layers(name).items():
            layer.calibrate(name, samples[layer_name])
        self.peft_config[name].route_calibration_size = min(s.shape[0] for s in samples.values())

    def set_token_marks(self, marks: torch.Tensor, adapter_name: str | None = None) -> None:
        """Give every layer the token marks (V,) that tell where sentences begin, from
        :func:`~lemoe_peft.routing.token_marks` of the tokenizer (``route_restart``); before any anchor exists."""
        name = self.resolve_adapter(adapter_name)
        for layer in self.lemoe_layers(name).values():
            layer.set_token_marks(name, marks)
        self.peft_config[name].route_vocab_size = marks.shape[0]

    def set_chat_markers(self, opening: Sequence[int], reply: Sequence[int], adapter_name: str | None = None) -> None:
        """Give every layer the ids a chat template writes before a user's message and between it and the reply,
        from :func:`~lemoe_peft.routing.chat_markers` of the tokenizer, so a question asked through the template is
        routed as the question alone; before any anchor exists."""
        name = self.resolve_adapter(adapter_name)
        for layer in self.lemoe_layers(name).values():
            layer.set_chat_markers(name, opening, reply)
        self.peft_config[name].route_chat_opening = list(opening)
        self.peft_config[name].route_chat_reply = list(reply)

    @contextlib.contextmanager
    def capture_layer_inputs(self) -> Iterator[dict[str, LayerInputs]]:
        """Within this context, record each LEMoE layer's input, padding mask and input ids; the dict it yields is
        filled with layer name -> (x, valid, ids) when the context exits."""
        layers = {id(module): key for key, module in self.model.named_modules() if isinstance(module, LEMoELayer)}
        captured: dict[int, Any] = {}
        result: dict[str, LayerInputs] = {}
        self.routing.captured = captured
        try:
            yield result
        finally:
            self.routing.captured = None
            result.update({layers[key]: value for key, value in captured.items()})

    @contextlib.contextmanager
    def reuse_routing(self, adapter_name: str | None = None) -> Iterator[RoutingDecisions]:
        """For the training steps of one batch: within this context the lowest LEMoE layer routes each part of the
        batch once (``decisions.reuse(part)`` names the part a forward call sees) and reuses that decision on later
        steps. Its input does not depend on any trained expert, so the decisions are those it would take again."""
        lowest = next(iter(self.lemoe_layers(self.resolve_adapter(adapter_name)).values()))
        decisions = RoutingDecisions(frozenset({id(lowest)}))
        self.routing.decisions = decisions
        try:
            yield decisions
        finally:
            self.routing.decisions = None

    # ------------------------------------------------------------------------------------------------ checkpoint
    def _load_state_dict_pre_hook(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """torch calls this before a state dict loads into the tuner (whichever PEFT version does the loading)."""
        self.fit_to_state_dict(state_dict, prefix + "model.{layer}.{field}.{adapter}")

    def fit_to_state_dict(
        self,
        state_dict: dict[str, torch.Tensor],
        key: str = "{layer}.{field}.{adapter}",
        adapter_names: list[str] | None = None,
    ) -> None:
        """Size each adapter (default: all) that holds nothing yet to the experts and anchors ``state_dict`` brings for
        it; refuse one that holds other numbers. ``key`` formats a state-dict key from a layer, a field and an adapter
        name."""
        lemoe_adapters = [name for name, config in self.peft_config.items() if isinstance(config, LEMoEConfig)]
        for name in adapter_names or lemoe_adapters:
            config = self.peft_config[name]
            counts = _state_dict_counts(state_dict, key, list(self.lemoe_layers(name)), name)
            held = tuple(getattr(config, field) for field in _COUNT_FIELDS)
            if counts is None or counts == held:
                continue
            wanted = ", ".join(f"{field}={count}" for field, count in zip(_COUNT_FIELDS, counts, strict=True))
            if any(held):
                have = ", ".join(f"{field}={count}" for field, count in zip(_COUNT_FIELDS, held, strict=True))
                raise ValueError(
                    f"The state dict holds {wanted} for adapter '{name}', which holds {have}; load it into a "
                    f"fresh adapter or one made with LEMoEConfig({wanted})."
                )
            for field, count in zip(_COUNT_FIELDS, counts, strict=True):
                setattr(config, field, count)
            for layer in self.lemoe_layers(name).values():
                layer.update_layer(name, config)
            logger.warning(
                "Adapter '%s' was sized from a state dict (%s). A state dict holds no edit log (adapter_config.json "
                "does), so this adapter has none.",
                name,
                wanted,
            )

    @classmethod
    def _get_adapter_state_dict(cls, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        # peft >= 0.21 selects the tensors of every tuner layer, a stacked LoRA's too: keep LEMoE's, named by the
        # targeted module even when another adapter wraps the LEMoE layer (its `base_layer`)
        selected = super()._get_adapter_state_dict(*args, **kwargs)
        return {_canonical_key(key): tensor for key, tensor in selected.items() if ".lemoe_" in key}

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LEMoEConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, LEMoEModel):  # peft >= 0.21 maps the keys to the model's, so size the adapter first
            tuner.fit_to_state_dict(state_dict, "base_model.model.{layer}.{field}", [adapter_name])
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {
            key: tensor
            for key, tensor in model.state_dict().items()
            if ".lemoe_" in key and (key.endswith(f".{adapter_name}"))
        }
        actual_keys = {_canonical_key(key): key for key in expected}
        remapped = {actual_keys.get(key, key): tensor for key, tensor in remapped.items()}
        for key in expected.keys() - remapped.keys():
            if key.rsplit(".", 2)[-2] in ADDED_LATER:  # a file of an earlier release: keep the default
                remapped[key] = expected[key]
        missing = sorted(key for key in expected if key not in remapped)
        mismatched = sorted(
            f"{key}: file {tuple(remapped[key].shape)}, config {tuple(tensor.shape)}"
            for key, tensor in expected.items()
            if key in remapped and remapped[key].shape != tensor.shape
        )
        if missing or mismatched:
            raise ValueError(
                f"The LEMoE checkpoint does not match its adapter_config.json (num_experts={config.num_experts}, "
                f"num_anchors={config.num_anchors}) or this base model; nothing was loaded. "
                + (f"Missing tensors: {missing[:4]}{' ...' if len(missing) > 4 else ''}. " if missing else "")
                + (f"Shape mismatches: {mismatched[:4]}" if mismatched else "")
            )
        return remapped


def _state_dict_counts(
    state_dict: dict[str, torch.Tensor], key: str, layer_names: list[str], adapter_name: str
) -> tuple[int, int, int, int] | None:
    """(experts, anchors, subjects, marked token ids) that ``state_dict`` holds for ``adapter_name``, read off its
    first LEMoE layer."""
    for layer in layer_names:
        frozen, keys, subjects, marks, newest = (
            key.format(layer=layer, field=f, adapter=adapter_name) for f in _COUNTED
        )
        if frozen in state_dict and keys in state_dict:
            num_subjects, vocab = (state_dict[k].shape[0] if k in state_dict else 0 for k in (subjects, marks))
            experts = state_dict[frozen].shape[0] + int(newest in state_dict)
            return experts, state_dict[keys].shape[0], num_subjects, vocab
    return None
