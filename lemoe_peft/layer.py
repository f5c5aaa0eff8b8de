"""``LEMoELayer``: experts and anchor keys beside one FFN output projection (``nn.Linear`` or GPT-2's ``Conv1D``).

Storage is flat and keyed by adapter name, so every tensor saves to one safetensors entry and reloads under any name:

* ``lemoe_A`` / ``lemoe_B``: the newest expert (trainable), ``(d_in, r)`` and ``(r, d_out)``;
* ``lemoe_frozen_A`` / ``lemoe_frozen_B``: all earlier experts, stacked ``(E-1, d_in, r)`` / ``(E-1, r, d_out)``;
* ``lemoe_keys`` ``(N, d_in)``, ``lemoe_key_expert`` ``(N,)`` and ``lemoe_key_threshold`` ``(N,)``: anchor keys, the
  expert owning each, and the score each needs;
* ``lemoe_route_mean`` / ``lemoe_route_basis`` / ``lemoe_route_scale``: the whitening applied to routing queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapter_file import ROUTING_STATE, SAVED_BUFFERS
from .config import LEMoEConfig
from .routing import CallContext, RoutingSession, causal_mean, select_experts, whiten, whitening_statistics

_ACTIVATIONS = {"silu": nn.functional.silu, "gelu": nn.functional.gelu, "relu": nn.functional.relu}

MERGE_REFUSAL = (
    "LEMoE cannot be merged into the base weights: each token is routed to a different expert, or to none, "
    "depending on its input, so no single dense weight reproduces the adaptor. Use `unload()` to get the base "
    "model back, or keep the adapter attached."
)


@dataclass(frozen=True)
class RouteSettings:
    """The per-adapter routing settings a layer needs at forward time (copied from ``LEMoEConfig``)."""

    pooling: str
    similarity: str
    top_k: int
    temperature: float
    activation: str

    @classmethod
    def from_config(cls, config: LEMoEConfig) -> RouteSettings:
        return cls(
            config.route_pooling,
            config.route_similarity,
            config.top_k,
            config.route_temperature,
            config.expert_activation,
        )


def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(
        f"LEMoE can only be put beside nn.Linear or transformers' Conv1D layers, not {type(layer).__name__}; "
        "point `target_modules` at the FFN's output projection."
    )


def _per_row_matmul(rows: torch.Tensor, stacked: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``rows[i] @ stacked[index[i]]`` for rows (n, d) and stacked matrices (E, d, m), without copying the matrices:
    ``embedding_bag`` sums the d rows of matrix ``index[i]``, weighted by ``rows[i]``."""
    width = stacked.shape[1]
    bags = index[:, None] * width + torch.arange(width, device=index.device)
    return F.embedding_bag(bags, stacked.reshape(-1, stacked.shape[2]), per_sample_weights=rows, mode="sum")


class LEMoELayer(BaseTunerLayer):
    adapter_layer_names = ("lemoe_A", "lemoe_B")
    other_param_names = (
        *SAVED_BUFFERS,
        "lemoe_settings",
    )

    def __init__(self, base_layer: nn.Module, routing: RoutingSession) -> None:
        self.base_layer = base_layer
        self.lemoe_A = nn.ParameterDict()
        self.lemoe_B = nn.ParameterDict()
        self.lemoe_frozen_A = BufferDict(persistent=True)
        self.lemoe_frozen_B = BufferDict(persistent=True)
        self.lemoe_keys = BufferDict(persistent=True)
        self.lemoe_key_expert = BufferDict(persistent=True)
        self.lemoe_key_threshold = BufferDict(persistent=True)
        self.lemoe_route_mean = BufferDict(persistent=True)
        self.lemoe_route_basis = BufferDict(persistent=True)
        self.lemoe_route_scale = BufferDict(persistent=True)
        self.lemoe_settings: dict[str, RouteSettings] = {}
        self.routing_session = routing
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = _features(self.get_base_layer())

    # ----------------------------------------------------------------------------------------------- construction
    def update_layer(self, adapter_name: str, config: LEMoEConfig, **kwargs: Any) -> None:
        """Create the adapter's tensors with the shapes recorded in ``config`` (values come from training or a load)."""
        d_in, d_out, rank = self.in_features, self.out_features, config.expert_rank
        whiten_rank = min(config.route_whiten_rank, d_in)
        self.lemoe_settings[adapter_name] = RouteSettings.from_config(config)
        experts = [self._new_expert(rank, config.init_weights) for _ in range(config.num_experts)]
        frozen = experts[:-1]
        self.lemoe_frozen_A[adapter_name] = (
            torch.stack([a for a, _ in frozen]) if frozen else torch.zeros(0, d_in, rank)
        )
        self.lemoe_frozen_B[adapter_name] = (
            torch.stack([b for _, b in frozen]) if frozen else torch.zeros(0, rank, d_out)
        )
        if adapter_name in self.lemoe_A:  # a rebuild (restoring a checkpoint) replaces the newest expert
            del self.lemoe_A[adapter_name], self.lemoe_B[adapter_name]
        if experts:
            self.lemoe_A[adapter_name], self.lemoe_B[adapter_name] = map(nn.Parameter, experts[-1])
        self.lemoe_keys[adapter_name] = torch.zeros(config.num_anchors, d_in)
        self.lemoe_key_expert[adapter_name] = torch.zeros(config.num_anchors, dtype=torch.long)
        self.lemoe_key_threshold[adapter_name] = torch.full((config.num_anchors,), float(config.route_threshold))
        self.lemoe_route_mean[adapter_name] = torch.zeros(d_in)
        self.lemoe_route_basis[adapter_name] = torch.zeros(d_in, whiten_rank)
        self.lemoe_route_scale[adapter_name] = torch.ones(whiten_rank + 1)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT casts float buffers to a half-precision base's dtype (0.18 even integer ones): the routing state keeps
        # its own dtype (float32 keys and whitening, int64 owners) and only follows the device
        routing = {store: getattr(self, store)[adapter_name] for store in ROUTING_STATE}
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        for store, tensor in routing.items():
            getattr(self, store)[adapter_name] = tensor.to(device=getattr(self, store)[adapter_name].device)

    def _new_expert(self, rank: int, zero_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (d_in, r) and (r, d_out) of a fresh expert: the input side as LoRA's A; the output side zero (the
        expert starts with no effect) or, for tests of non-trivial experts, small random values."""
        weight_in = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(weight_in, a=math.sqrt(5))
        weight_out = (
            torch.zeros(rank, self.out_features) if zero_output else torch.randn(rank, self.out_features) * 0.02
        )
        return weight_in.T.contiguous(), weight_out

    # ------------------------------------------------------------------------------------------------- inspection
    def num_experts(self, adapter_name: str) -> int:
        return self.lemoe_frozen_A[adapter_name].shape[0] + int(adapter_name in self.lemoe_A)

    def num_anchors(self, adapter_name: str) -> int:
        return self.lemoe_keys[adapter_name].shape[0]

    # ----------------------------------------------------------------------------------------------------- growth
    def add_expert(self, adapter_name: str, init_weights: bool = True) -> int:
        """Freeze the newest expert (if any) and start a new trainable one; return its index."""
        frozen_a, frozen_b = self.lemoe_frozen_A[adapter_name], self.lemoe_frozen_B[adapter_name]
        if adapter_name in self.lemoe_A:
            self.lemoe_frozen_A[adapter_name] = torch.cat([frozen_a, self.lemoe_A[adapter_name].detach()[None]])
            self.lemoe_frozen_B[adapter_name] = torch.cat([frozen_b, self.lemoe_B[adapter_name].detach()[None]])
        like = self.lemoe_frozen_A[adapter_name]
        weight_in, weight_out = self._new_expert(frozen_a.shape[2], init_weights)
        self.lemoe_A[adapter_name] = nn.Parameter(weight_in.to(like))
        self.lemoe_B[adapter_name] = nn.Parameter(weight_out.to(like))
        return self.num_experts(adapter_name) - 1

    def remove_expert(self, adapter_name: str, expert: int) -> int:
        """Delete expert ``expert`` and its anchor keys (later experts shift down by one); return the keys removed."""
        count = self.num_experts(adapter_name)
        if not 0 <= expert < count:
            raise IndexError(f"Expert {expert} does not exist; adapter '{adapter_name}' has {count} experts.")
        frozen_a, frozen_b = self.lemoe_frozen_A[adapter_name], self.lemoe_frozen_B[adapter_name]
        if expert == count - 1:  # the newest: the one before it becomes the newest
            del self.lemoe_A[adapter_name], self.lemoe_B[adapter_name]
            if count > 1:
                self.lemoe_A[adapter_name] = nn.Parameter(frozen_a[-1].clone())
                self.lemoe_B[adapter_name] = nn.Parameter(frozen_b[-1].clone())
                self.lemoe_frozen_A[adapter_name], self.lemoe_frozen_B[adapter_name] = frozen_a[:-1], frozen_b[:-1]
        else:
            keep = [i for i in range(frozen_a.shape[0]) if i != expert]
            self.lemoe_frozen_A[adapter_name], self.lemoe_frozen_B[adapter_name] = frozen_a[keep], frozen_b[keep]
        owners = self.lemoe_key_expert[adapter_name]
        kept = owners != expert
        self.lemoe_keys[adapter_name] = self.lemoe_keys[adapter_name][kept]
        self.lemoe_key_threshold[adapter_name] = self.lemoe_key_threshold[adapter_name][kept]
        self.lemoe_key_expert[adapter_name] = owners[kept] - (owners[kept] > expert).long()
        return int((~kept).sum())

    def add_anchors(self, adapter_name: str, expert: int, keys: torch.Tensor, threshold: torch.Tensor) -> None:
        """Append anchor ``keys`` (n, d_in), already in query space, owned by ``expert``, each with its threshold."""
        if not 0 <= expert < self.num_experts(adapter_name):
            raise IndexError(f"Cannot add anchors to expert {expert}: it does not exist.")
        old = self.lemoe_keys[adapter_name]
        if keys.dim() != 2 or keys.shape[1] != old.shape[1]:
            raise ValueError(f"Anchor keys must have shape (n, {old.shape[1]}), got {tuple(keys.shape)}.")
        owners = torch.full((keys.shape[0],), expert, dtype=torch.long, device=old.device)
        self.lemoe_keys[adapter_name] = torch.cat([old, keys.to(old)])
        self.lemoe_key_expert[adapter_name] = torch.cat([self.lemoe_key_expert[adapter_name], owners])
        threshold = threshold.to(old).expand(keys.shape[0])
        self.lemoe_key_threshold[adapter_name] = torch.cat([self.lemoe_key_threshold[adapter_name], threshold])

    def replace_anchors(self, adapter_name: str, expert: int, keys: torch.Tensor, threshold: torch.Tensor) -> None:
        """Swap ``expert``'s anchor keys for ``keys`` (same meaning as in :meth:`add_anchors`)."""
        kept = self.lemoe_key_expert[adapter_name] != expert
        for store in (self.lemoe_keys, self.lemoe_key_expert, self.lemoe_key_threshold):
            store[adapter_name] = store[adapter_name][kept]
        self.add_anchors(adapter_name, expert, keys, threshold)

    def calibrate(self, adapter_name: str, samples: torch.Tensor) -> None:
        """Set the routing whitening from pooled queries (n, d_in) of generic text. Anchors must not exist yet."""
        if self.num_anchors(adapter_name) > 0:
            raise RuntimeError("Routing calibration is frozen once anchors exist: re-calibrating would move them.")
        mean, basis, scale = whitening_statistics(samples, self.lemoe_route_basis[adapter_name].shape[1])
        like = self.lemoe_route_mean[adapter_name]
        self.lemoe_route_mean[adapter_name] = mean.to(like)
        self.lemoe_route_basis[adapter_name] = basis.to(like)
        self.lemoe_route_scale[adapter_name] = scale.to(like)

    # ---------------------------------------------------------------------------------------------------- routing
    def pooled_queries(self, adapter_name: str, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (un-whitened) routing queries of a whole sequence batch ``x`` (B, T, d_in), without any prefix."""
        if self.lemoe_settings[adapter_name].pooling == "token":
            return x.float()
        return causal_mean(x, valid)[0]

    def route_queries(self, adapter_name: str, pooled: torch.Tensor) -> torch.Tensor:
        """Map raw pooled queries into the space where anchor keys live."""
        return whiten(
            pooled.float(),
            self.lemoe_route_mean[adapter_name].float(),
            self.lemoe_route_basis[adapter_name].float(),
            self.lemoe_route_scale[adapter_name].float(),
            normalize=self.lemoe_settings[adapter_name].similarity == "cosine",
        )

    def route(self, adapter_name: str, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts (..., k) (-1: none) and mixing weights (..., k) for raw pooled queries."""
        settings = self.lemoe_settings[adapter_name]
        return select_experts(
            self.route_queries(adapter_name, pooled),
            self.lemoe_keys[adapter_name].float(),
            self.lemoe_key_expert[adapter_name],
            self.lemoe_key_threshold[adapter_name].float(),
            self.num_experts(adapter_name),
            settings.top_k,
            settings.temperature,
        )

    def _pooled_for_call(
        self, x: torch.Tensor, pooling: str, cache: dict[str, torch.Tensor], context: CallContext | None
    ) -> torch.Tensor:
        """Pooled queries for the tokens of the current forward call, continuing cached generation if any."""
        if pooling not in cache:
            if pooling == "token":
                cache[pooling] = x.float()
            else:
                valid, prefix = (None, None) if context is None else (context.valid, context.prefix.get(id(self)))
                if valid is not None and valid.shape != x.shape[:2]:
                    valid = None
                if prefix is not None and prefix[0].shape[0] != x.shape[0]:
                    prefix = None
                cache[pooling], sums = causal_mean(x, valid, prefix)
                if context is not None:
                    context.updated[id(self)] = sums
        return cache[pooling]

    # ---------------------------------------------------------------------------------------------------- experts
    def newest_expert(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lemoe_A[adapter_name], self.lemoe_B[adapter_name]

    def _activate(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        activation = self.lemoe_settings[adapter_name].activation
        return hidden if activation == "identity" else _ACTIVATIONS[activation](hidden)

    def mix_experts(
        self, adapter_name: str, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(token); zero where no expert is chosen.

        Shapes do not depend on the routing (torch.compile traces it without graph breaks): the newest expert runs on
        every token, scaled by its mixing weight (0 where not chosen); the frozen experts are applied per token and
        ``top_k`` slot with ``embedding_bag``, which reads only the chosen expert's weights (the cost does not grow with
        the number of experts)."""
        flat_x = x.reshape(-1, x.shape[-1])
        flat_experts = experts.reshape(flat_x.shape[0], -1)
        flat_weights = weights.reshape(flat_x.shape[0], -1)
        newest = self.num_experts(adapter_name) - 1
        weight_in, weight_out = self.newest_expert(adapter_name)
        flat_x = flat_x.to(weight_in.dtype)
        share = (flat_weights * (flat_experts == newest)).sum(dim=-1, keepdim=True)
        out = (self._activate(adapter_name, flat_x @ weight_in) @ weight_out) * share.to(weight_in.dtype)
        frozen_in, frozen_out = self.lemoe_frozen_A[adapter_name], self.lemoe_frozen_B[adapter_name]
        if frozen_in.shape[0] > 0:
            slots = flat_experts.shape[1]
            index = flat_experts.clamp(0, newest - 1).reshape(-1)  # slots without a frozen expert get weight 0
            inputs = flat_x[:, None].expand(-1, slots, -1).reshape(index.shape[0], -1)
            hidden = self._activate(adapter_name, _per_row_matmul(inputs, frozen_in, index))
            contribution = _per_row_matmul(hidden, frozen_out, index).view(flat_x.shape[0], slots, -1)
            is_frozen = (flat_experts >= 0) & (flat_experts < newest)
            out = out + (contribution * (flat_weights * is_frozen).to(contribution.dtype)[..., None]).sum(dim=1)
        return out.view(*x.shape[:-1], -1)


class LEMoELinear(nn.Module, LEMoELayer):
    """A LEMoE adaptor beside an ``nn.Linear`` or ``Conv1D`` FFN output projection."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LEMoEConfig, routing: RoutingSession) -> None:
        super().__init__()
        LEMoELayer.__init__(self, base_layer, routing)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(MERGE_REFUSAL)

    def unmerge(self) -> None:
        raise NotImplementedError(MERGE_REFUSAL)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        context = self.routing_session.context(x.shape[0])
        sequences = self._as_sequences(x, context)
        if self.routing_session.captured is not None:
            self.routing_session.captured[id(self)] = (sequences.detach(), None if context is None else context.valid)
        if self.disable_adapters:
            return result
        pooled: dict[str, torch.Tensor] = {}
        for adapter_name in self.active_adapters:
            if adapter_name not in self.lemoe_keys or self.num_anchors(adapter_name) == 0:
                continue
            query = self._pooled_for_call(sequences, self.lemoe_settings[adapter_name].pooling, pooled, context)
            experts, weights = self.route(adapter_name, query)
            delta = self.mix_experts(adapter_name, sequences, experts, weights)
            result = result + delta.reshape(result.shape).to(result.dtype)
        return result

    @staticmethod
    def _as_sequences(x: torch.Tensor, context: CallContext | None) -> torch.Tensor:
        """``x`` as (batch, tokens, features): some models (OPT) flatten the tokens of a batch before the FFN."""
        if x.dim() == 3:
            return x
        if context is not None and context.tokens is not None and x.shape[0] == context.tokens[0] * context.tokens[1]:
            return x.view(*context.tokens, x.shape[-1])
        return x.reshape(1, -1, x.shape[-1])  # unknown batch layout: one sequence

    def __repr__(self) -> str:
        return "lemoe." + super().__repr__()
