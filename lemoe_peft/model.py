"""``LEMoEModel``: the PEFT tuner that inserts LEMoE layers and grows, prunes and routes their experts."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from .config import DEFAULT_TARGET_MODULES, LEMoEConfig, default_layer_index
from .layer import MERGE_REFUSAL, LEMoELayer, LEMoELinear
from .routing import RoutingSession

logger = logging.getLogger(__name__)


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
    def _pre_injection_hook(self, model: nn.Module, config: LEMoEConfig, adapter_name: str) -> None:
        if hasattr(self, "routing"):
            return
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
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added, inactive adapter is not trainable
        self._replace_module(parent, target_name, new_module, target)

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
    ) -> None:
        """Give ``expert`` anchor keys: ``keys`` maps each LEMoE layer name to (n, d) vectors in query space (see
        :meth:`LEMoELayer.route_queries`); every layer receives the same number n of keys."""
        name = self.resolve_adapter(adapter_name)
        layers = self.lemoe_layers(name)
        if set(keys) != set(layers) or len({k.shape[0] for k in keys.values()}) != 1:
            raise ValueError(f"Give the same number of anchor keys for exactly these layers: {sorted(layers)}.")
        config = self.peft_config[name]
        for layer_name, layer in layers.items():
            layer.add_anchors(name, expert, keys[layer_name], self._threshold(config, threshold))
        config.num_anchors += next(iter(keys.values())).shape[0]

    def replace_anchors(
        self,
        expert: int,
        keys: dict[str, torch.Tensor],
        threshold: float | torch.Tensor | None = None,
        adapter_name: str | None = None,
    ) -> None:
        """Swap the anchor keys of ``expert`` in the layers named in ``keys`` for new ones, as many as before."""
        name = self.resolve_adapter(adapter_name)
        layers = self.lemoe_layers(name)
        for layer_name, new_keys in keys.items():
            layer = layers[layer_name]
            if int((layer.lemoe_key_expert[name] == expert).sum()) != new_keys.shape[0]:
                raise ValueError(f"Expert {expert} has a different number of anchors in {layer_name}.")
            layer.replace_anchors(name, expert, new_keys, self._threshold(self.peft_config[name], threshold))

    @staticmethod
    def _threshold(config: LEMoEConfig, threshold: float | torch.Tensor | None) -> torch.Tensor:
        return torch.as_tensor(config.route_threshold if threshold is None else threshold, dtype=torch.float32)

    def calibrate_routing(self, samples: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Set each layer's routing whitening from pooled queries of generic text (layer name -> (n, d))."""
        name = self.resolve_adapter(adapter_name)
        for layer_name, layer in self.lemoe_layers(name).items():
            layer.calibrate(name, samples[layer_name])
        self.peft_config[name].route_calibration_size = min(s.shape[0] for s in samples.values())

    @contextlib.contextmanager
    def capture_layer_inputs(self) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor | None]]]:
        """Within this context, record each LEMoE layer's input and padding mask; the dict it yields is filled with
        layer name -> (x, valid) when the context exits."""
        layers = {id(module): key for key, module in self.model.named_modules() if isinstance(module, LEMoELayer)}
        captured: dict[int, Any] = {}
        result: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.routing.captured = captured
        try:
            yield result
        finally:
            self.routing.captured = None
            result.update({layers[key]: value for key, value in captured.items()})

    # ------------------------------------------------------------------------------------------------ checkpoint
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
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {
            key: tensor
            for key, tensor in model.state_dict().items()
            if ".lemoe_" in key and (key.endswith(f".{adapter_name}"))
        }
        actual_keys = {_canonical_key(key): key for key in expected}
        remapped = {actual_keys.get(key, key): tensor for key, tensor in remapped.items()}
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
