"""``LEMoELayer``: experts and anchor keys beside one FFN output projection (``nn.Linear`` or GPT-2's ``Conv1D``).

Storage is flat and keyed by adapter name, so every tensor saves to one safetensors entry and reloads under any name:

* ``lemoe_A`` / ``lemoe_B``: the newest expert (trainable), ``(d_in, r)`` and ``(r, d_out)``;
* ``lemoe_frozen_A`` / ``lemoe_frozen_B``: all earlier experts, stacked ``(E-1, d_in, r)`` / ``(E-1, r, d_out)``;
* ``lemoe_keys`` ``(N, k)``, ``lemoe_key_expert`` ``(N,)`` and ``lemoe_key_threshold`` ``(N,)``: anchor keys, the
  expert owning each, and the score each needs;
* ``lemoe_subjects`` ``(S, k)`` and ``lemoe_subject_expert`` ``(S,)``: the keys of the edited subjects and their
  experts; ``lemoe_subject_alias`` ``(S,)``: the subject each key reads (its own index, or the index of the subject's
  first key: a subject may have several keys, e.g. as read in the edit prompt and on its own);
  ``lemoe_subject_names`` ``(S, L)``: each key's subject name as token ids, right-aligned after -1s (all -1: none);
  ``lemoe_key_subject`` ``(N,)``: the subject gating each anchor (-1: none);
* ``lemoe_route_mean`` ``(d_in,)`` and ``lemoe_route_projection`` ``(d_in, k)``: the whitening that maps routing
  queries into the k-dimensional space of the keys (``k = route_key_dim``; ``mean_and_token`` queries whiten their
  two halves apart, ``k / 2`` wide each, and subject keys have one half's width);
* ``lemoe_token_marks`` ``(V,)`` uint8: per token id, whether it ends a sentence or has whitespace before or after it
  (:func:`~lemoe_peft.routing.token_marks`), which tells where the running-mean query restarts (V = 0: nowhere).

The stacks that grow with the stream (frozen experts, anchor keys, owners, thresholds) are prefix views of a storage
with spare rows (:func:`append_rows`), so adding an expert or anchors copies only the new rows: amortized O(1) per
addition instead of a copy of everything stored. ``state_dict`` and safetensors see only the live rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapter_file import ROUTING_STATE, SAVED_BUFFERS
from .config import LEMoEConfig
from .routing import (
    CallContext,
    LayerInputs,
    RouteState,
    RoutingSession,
    causal_mean,
    chat_turn_table,
    chat_turns,
    hold_queries,
    keep_experts,
    last_routes,
    left_out_subjects,
    named_subjects,
    route_projection,
    select_experts,
    sentence_starts,
    subject_presence,
    token_counts,
    whiten,
    whitening_statistics,
)

_ACTIVATIONS = {"silu": nn.functional.silu, "gelu": nn.functional.gelu, "relu": nn.functional.relu}

MERGE_REFUSAL = (
    "LEMoE cannot be merged into the base weights: each token is routed to a different expert, or to none, "
    "depending on its input, so no single dense weight reproduces the adaptor. Use `unload()` to get the base "
    "model back, or keep the adapter attached."
)


@dataclass(frozen=True)
class RouteSettings:
    """The per-adapter routing settings of a layer (copied from ``LEMoEConfig``)."""

    pooling: str
    token_weight: float
    similarity: str
    top_k: int
    temperature: float
    activation: str
    subject_threshold: float | None
    subject_margin: float | None
    subject_names: str
    whiten_rank: int
    generated_tokens: str
    restart: str
    subject_tokens: str
    chat_opening: tuple[int, ...]
    chat_reply: tuple[int, ...]

    @classmethod
    def from_config(cls, config: LEMoEConfig) -> RouteSettings:
        return cls(
            config.route_pooling,
            config.route_token_weight,
            config.route_similarity,
            config.top_k,
            config.route_temperature,
            config.expert_activation,
            config.route_subject_threshold,
            config.route_subject_margin,
            config.route_subject_names,
            config.route_whiten_rank,
            config.route_generated_tokens,
            config.route_restart,
            config.route_subject_tokens,
            tuple(config.route_chat_opening),
            tuple(config.route_chat_reply),
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


def _spare_rows(buffer: torch.Tensor) -> int:
    """How many rows the storage behind ``buffer`` holds after ``buffer``'s own (0 unless it is a prefix view)."""
    row = math.prod(buffer.shape[1:])
    if row == 0 or buffer.device.type == "meta" or not buffer.is_contiguous():
        return 0
    stored = buffer.untyped_storage().nbytes() // buffer.element_size() - buffer.storage_offset()
    return stored // row - buffer.shape[0]


@torch.no_grad()
def append_rows(buffer: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``torch.cat([buffer, rows])`` (same dtype promotion), returned as a prefix view of a storage that doubles when
    full, so a stream of appends copies each row a constant number of times on average. Only rows past the end of
    ``buffer`` are written; tensors that alias ``buffer`` keep their values."""
    count, new = buffer.shape[0], rows.shape[0]
    dtype = torch.promote_types(buffer.dtype, rows.dtype)
    if dtype == buffer.dtype and _spare_rows(buffer) >= new:
        grown = buffer.new_empty(0).set_(
            buffer.untyped_storage(), buffer.storage_offset(), (count + new, *rows.shape[1:])
        )
    else:
        grown = buffer.new_empty((max(2 * count, count + new), *buffer.shape[1:]), dtype=dtype)[: count + new]
        grown[:count] = buffer
    grown[count:] = rows
    return grown


def offload_execution_device(layer: nn.Module) -> torch.device | None:
    """The device an offloaded layer (weights on ``meta``, loaded per call by an accelerate hook) computes on."""
    weight = getattr(layer, "weight", None)
    if weight is None or weight.device.type != "meta":
        return None
    hook = getattr(layer, "_hf_hook", None)
    for part in getattr(hook, "hooks", [hook]):
        if getattr(part, "execution_device", None) is not None:
            return torch.device(part.execution_device)
    return None


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
        self.lemoe_key_subject = BufferDict(persistent=True)
        self.lemoe_subjects = BufferDict(persistent=True)
        self.lemoe_subject_expert = BufferDict(persistent=True)
        self.lemoe_subject_alias = BufferDict(persistent=True)
        self.lemoe_subject_names = BufferDict(persistent=True)
        self.lemoe_route_mean = BufferDict(persistent=True)
        self.lemoe_route_projection = BufferDict(persistent=True)
        self.lemoe_token_marks = BufferDict(persistent=True)
        self.lemoe_settings: dict[str, RouteSettings] = {}
        self.routing_session = routing
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = _features(self.get_base_layer())

    # ----------------------------------------------------------------------------------------------- construction
    def update_layer(self, adapter_name: str, config: LEMoEConfig, **kwargs: Any) -> None:
        """Create the adapter's tensors with the shapes recorded in ``config`` (values come from training or a load)."""
        d_in, d_out, rank = self.in_features, self.out_features, config.expert_rank
        parts = 2 if config.route_pooling == "mean_and_token" else 1
        d_key = min((config.route_key_dim or parts * d_in) // parts, d_in)  # the width of one whitened part
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
        self.lemoe_keys[adapter_name] = torch.zeros(config.num_anchors, parts * d_key)
        self.lemoe_key_expert[adapter_name] = torch.zeros(config.num_anchors, dtype=torch.long)
        self.lemoe_key_threshold[adapter_name] = torch.full((config.num_anchors,), float(config.route_threshold))
        self.lemoe_key_subject[adapter_name] = torch.full((config.num_anchors,), -1, dtype=torch.long)
        self.lemoe_subjects[adapter_name] = torch.zeros(config.num_subjects, d_key)
        self.lemoe_subject_expert[adapter_name] = torch.zeros(config.num_subjects, dtype=torch.long)
        self.lemoe_subject_alias[adapter_name] = torch.arange(config.num_subjects)  # adapters saved without aliases
        self.lemoe_subject_names[adapter_name] = torch.full(  # adapters saved without names: none
            (config.num_subjects, config.route_subject_name_tokens), -1, dtype=torch.long
        )
        self.lemoe_route_mean[adapter_name] = torch.zeros(d_in)
        # before calibration: no whitening (k = d_in) or a fixed random reduction of the raw inputs
        self.lemoe_route_projection[adapter_name] = route_projection(torch.zeros(d_in, 0), torch.ones(1), d_key)
        self.lemoe_token_marks[adapter_name] = torch.zeros(config.route_vocab_size, dtype=torch.uint8)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT casts float buffers to a half-precision base's dtype (0.18 even integer ones): the routing state keeps
        # its own dtype (float32 keys and whitening, int64 owners) and only follows the device. Beside an offloaded
        # base layer (weights on meta) the adapter lives on the device the layer computes on.
        device = device or offload_execution_device(self.get_base_layer())
        routing = {store: getattr(self, store)[adapter_name] for store in ROUTING_STATE}
        if device is None:
            super()._move_adapter_to_device_of_base_layer(adapter_name)
        else:  # an explicit device: move without casting (peft 0.18's method fails when given one)
            for name in (*self.adapter_layer_names, *self.other_param_names):
                store = getattr(self, name, None)
                if isinstance(store, nn.ParameterDict) and adapter_name in store:
                    store[adapter_name].data = store[adapter_name].data.to(device)
                elif isinstance(store, BufferDict) and adapter_name in store:
                    store[adapter_name] = store[adapter_name].to(device)
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
            self.lemoe_frozen_A[adapter_name] = append_rows(frozen_a, self.lemoe_A[adapter_name].detach()[None])
            self.lemoe_frozen_B[adapter_name] = append_rows(frozen_b, self.lemoe_B[adapter_name].detach()[None])
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
        removed = self._drop_anchors(adapter_name, expert)
        for store in (self.lemoe_key_expert, self.lemoe_subject_expert):
            owners = store[adapter_name]
            store[adapter_name] = owners - (owners > expert).long()
        return removed

    def _drop_anchors(self, adapter_name: str, expert: int) -> int:
        """Delete ``expert``'s anchor keys and subject keys; return the number of anchor keys deleted."""
        kept = self.lemoe_key_expert[adapter_name] != expert
        kept_subjects = self.lemoe_subject_expert[adapter_name] != expert
        if not _is_prefix(kept_subjects):  # subjects are renumbered: map old indices to new ones (-1 stays -1)
            new_index = torch.cat([kept_subjects.long().cumsum(0) - 1, kept_subjects.new_full((1,), -1).long()])
            for store in (self.lemoe_key_subject, self.lemoe_subject_alias):
                store[adapter_name] = new_index[store[adapter_name]]
        for store in (self.lemoe_keys, self.lemoe_key_expert, self.lemoe_key_threshold, self.lemoe_key_subject):
            store[adapter_name] = _kept_rows(store[adapter_name], kept)
        for store in (
            self.lemoe_subjects,
            self.lemoe_subject_expert,
            self.lemoe_subject_alias,
            self.lemoe_subject_names,
        ):
            store[adapter_name] = _kept_rows(store[adapter_name], kept_subjects)
        return int((~kept).sum())

    def add_anchors(
        self,
        adapter_name: str,
        expert: int,
        keys: torch.Tensor,
        threshold: torch.Tensor,
        subjects: torch.Tensor | None = None,
        key_subject: torch.Tensor | None = None,
        subject_alias: torch.Tensor | None = None,
        subject_names: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Append anchor ``keys`` (n, k), already in query space, owned by ``expert``, each with its threshold.

        ``subjects`` (s, k) are keys of the edited subjects (whitened token inputs, see :meth:`subject_queries`),
        ``key_subject`` (n,) says which of them gates each anchor (-1: none) and ``subject_alias`` (s,) which subject
        each key reads (default: its own; a key that reads another subject is a second key of it).
        ``subject_names`` gives each key the token ids of its subject's name, as the text it was read from wrote it
        (empty: none; a name longer than ``route_subject_name_tokens`` keeps its last tokens).
        """
        if not 0 <= expert < self.num_experts(adapter_name):
            raise IndexError(f"Cannot add anchors to expert {expert}: it does not exist.")
        old = self.lemoe_keys[adapter_name]
        if keys.dim() != 2 or keys.shape[1] != old.shape[1]:
            raise ValueError(f"Anchor keys must have shape (n, {old.shape[1]}), got {tuple(keys.shape)}.")
        n, device = keys.shape[0], old.device
        subject_width = self.lemoe_subjects[adapter_name].shape[1]
        subjects = keys.new_zeros(0, subject_width) if subjects is None else subjects
        key_subject = torch.full((n,), -1) if key_subject is None else key_subject
        subject_alias = torch.arange(len(subjects)) if subject_alias is None else subject_alias
        subject_names = [()] * len(subjects) if subject_names is None else subject_names
        if (
            subjects.shape[1:] != (subject_width,)
            or key_subject.shape != (n,)
            or (n > 0 and int(key_subject.max()) >= len(subjects))
            or subject_alias.shape != (len(subjects),)
            or (len(subjects) > 0 and not 0 <= int(subject_alias.min()) <= int(subject_alias.max()) < len(subjects))
            or len(subject_names) != len(subjects)
            or any(int(token) < 0 for name in subject_names for token in name)
        ):
            raise ValueError(
                f"Subject keys must have shape (s, {subject_width}), key_subject one index (or -1) per anchor, "
                "subject_alias one index per subject key and subject_names one list of token ids (>= 0) per key."
            )
        first_subject = self.lemoe_subjects[adapter_name].shape[0]
        key_subject = key_subject.to(device=device, dtype=torch.long)
        growth = {
            self.lemoe_keys: keys.to(old),
            self.lemoe_key_expert: torch.full((n,), expert, dtype=torch.long, device=device),
            self.lemoe_key_threshold: threshold.to(old).expand(n),
            self.lemoe_key_subject: torch.where(key_subject >= 0, key_subject + first_subject, key_subject),
            self.lemoe_subjects: subjects.to(old),
            self.lemoe_subject_expert: torch.full((len(subjects),), expert, dtype=torch.long, device=device),
            self.lemoe_subject_alias: subject_alias.to(device=device, dtype=torch.long) + first_subject,
            self.lemoe_subject_names: self._name_rows(adapter_name, subject_names).to(device),
        }
        for store, rows in growth.items():
            store[adapter_name] = append_rows(store[adapter_name], rows)

    def replace_anchors(
        self,
        adapter_name: str,
        expert: int,
        keys: torch.Tensor,
        threshold: torch.Tensor,
        subjects: torch.Tensor | None = None,
        key_subject: torch.Tensor | None = None,
        subject_alias: torch.Tensor | None = None,
        subject_names: Sequence[Sequence[int]] | None = None,
    ) -> None:
        """Swap ``expert``'s anchor and subject keys for new ones (same meaning as in :meth:`add_anchors`)."""
        self._drop_anchors(adapter_name, expert)
        self.add_anchors(adapter_name, expert, keys, threshold, subjects, key_subject, subject_alias, subject_names)

    def _name_rows(self, adapter_name: str, names: Sequence[Sequence[int]]) -> torch.Tensor:
        """Names as rows (s, L) of the names buffer: each name's last L token ids, right-aligned after -1s."""
        width = self.lemoe_subject_names[adapter_name].shape[1]
        rows = torch.full((len(names), width), -1, dtype=torch.long)
        for row, name in zip(rows, names, strict=True):
            kept = [int(token) for token in name][-width:]
            if kept:
                row[width - len(kept) :] = torch.tensor(kept)
        return rows

    def calibrate(self, adapter_name: str, samples: torch.Tensor) -> None:
        """Set the routing whitening from pooled queries (n, d_in) of generic text (of ``mean_and_token`` queries,
        the means). Anchors must not exist yet."""
        if self.num_anchors(adapter_name) > 0:
            raise RuntimeError("Routing calibration is frozen once anchors exist: re-calibrating would move them.")
        samples = samples[..., : self.in_features]
        mean, basis, scale = whitening_statistics(samples, self.lemoe_settings[adapter_name].whiten_rank)
        projection = self.lemoe_route_projection[adapter_name]
        self.lemoe_route_mean[adapter_name] = mean.to(self.lemoe_route_mean[adapter_name])
        self.lemoe_route_projection[adapter_name] = route_projection(basis, scale, projection.shape[1]).to(projection)

    def set_token_marks(self, adapter_name: str, marks: torch.Tensor) -> None:
        """Set the token marks (V,) that tell where sentences begin (:func:`~lemoe_peft.routing.token_marks`). Anchors
        must not exist yet: their keys were pooled over the sentences the old marks found."""
        if self.num_anchors(adapter_name) > 0:
            raise RuntimeError("Token marks are frozen once anchors exist: new marks would move the routing queries.")
        if marks.dim() != 1:
            raise ValueError(f"Token marks must have shape (V,), got {tuple(marks.shape)}.")
        self.lemoe_token_marks[adapter_name] = marks.to(self.lemoe_token_marks[adapter_name])

    def set_chat_markers(self, adapter_name: str, opening: Sequence[int], reply: Sequence[int]) -> None:
        """Set the ids a chat template writes before a user's message and between it and the reply
        (:func:`~lemoe_peft.routing.chat_markers`). Anchors must not exist yet: they would be pooled differently."""
        if self.num_anchors(adapter_name) > 0:
            raise RuntimeError("Chat markers are frozen once anchors exist: new ones would move the routing queries.")
        settings = self.lemoe_settings[adapter_name]
        self.lemoe_settings[adapter_name] = replace(settings, chat_opening=tuple(opening), chat_reply=tuple(reply))

    # ---------------------------------------------------------------------------------------------------- routing
    def pooled_queries(
        self, adapter_name: str, x: torch.Tensor, valid: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw (un-whitened) routing queries of a whole sequence batch ``x`` (B, T, d_in), without any prefix;
        ``ids`` (B, T) are its input ids, which tell where sentences and chat turns begin (None: the mean runs over
        everything)."""
        named = None
        if ids is not None and self._leaves_out_subjects(adapter_name):
            named, _ = named_subjects(ids, self.lemoe_subject_names[adapter_name], valid)
        return self._pooled(adapter_name, x, valid, ids, named=named)

    def _leaves_out_subjects(self, adapter_name: str) -> bool:
        """Whether subject names leave this adapter's running mean (``route_subject_tokens``): names must be read."""
        settings = self.lemoe_settings[adapter_name]
        return settings.subject_tokens == "left_out" and settings.subject_names != "off" and settings.pooling != "token"

    def _breaks(
        self,
        adapter_name: str,
        ids: torch.Tensor | None,
        valid: torch.Tensor | None,
        prefix: RouteState | None = None,
        state: RouteState | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Where the running-mean query starts again in a call with input ``ids`` (B, T) (a new sentence, with
        ``route_restart``; a user's message, with chat markers) and which of its tokens are held (the chat template's
        tokens before a reply); None where none can be. Continues ``prefix``'s calls and leaves this one's in
        ``state``."""
        settings, marks = self.lemoe_settings[adapter_name], self.lemoe_token_marks[adapter_name]
        starts = held = None
        if ids is None:
            return starts, held
        ids, valid = ids.to(marks.device), None if valid is None else valid.to(marks.device)
        if marks.shape[0] > 0 and settings.restart != "off" and settings.pooling != "token":  # token: no mean
            previous = None if prefix is None else prefix.marks.get(adapter_name)
            starts, last = sentence_starts(ids, marks, valid, previous)
            if state is not None:
                state.marks[adapter_name] = last
        if settings.chat_opening or settings.chat_reply:
            table = _chat_table(settings.chat_opening, settings.chat_reply, marks.device)
            recent = None if prefix is None else prefix.turn_ids.get(adapter_name)
            turns, held, recent = chat_turns(ids, table, valid, recent)
            starts = turns if starts is None else starts | turns
            if state is not None:
                state.turn_ids[adapter_name] = recent
        return starts, held

    def _pooled(
        self,
        adapter_name: str,
        x: torch.Tensor,
        valid: torch.Tensor | None,
        ids: torch.Tensor | None,
        prefix: RouteState | None = None,
        state: RouteState | None = None,
        named: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw queries (B, T, d_in) of the tokens ``x`` (B, T, d_in): their running means, the tokens, or both
        (B, T, 2 d_in) for ``mean_and_token``; held tokens (:meth:`_breaks`) take the query of the token before them,
        and the subject names ending at each token (``named`` (B, T, S)) leave the mean where subjects are left out.
        Continues ``prefix``'s calls and leaves this one's in ``state``."""
        pooling = self.lemoe_settings[adapter_name].pooling
        starts, held = self._breaks(adapter_name, ids, valid, prefix, state)
        if pooling == "token":
            pooled = x.float()
        else:
            weight = valid if held is None else ~held if valid is None else valid & ~held
            sums = None if prefix is None else prefix.sums.get(adapter_name)
            removed = None
            if named is not None and named.shape[-1] > 0 and self._leaves_out_subjects(adapter_name):
                names = self.lemoe_subject_names[adapter_name]
                recent = None if prefix is None else prefix.subject_inputs.get(adapter_name)
                recent = recent if recent is not None and recent[0].shape[::2] == x.shape[::2] else None
                removed, recent = left_out_subjects(x, weight, named, (names >= 0).sum(dim=1), starts, recent)
                if state is not None:
                    state.subject_inputs[adapter_name] = recent
            pooled, last = causal_mean(x, weight, sums, starts, removed)
            if state is not None:
                state.sums[adapter_name] = last
            pooled = torch.cat([pooled, x.float()], dim=-1) if pooling == "mean_and_token" else pooled
        if held is None:
            return pooled
        previous = None if prefix is None else prefix.queries.get(adapter_name)
        pooled, last_query = hold_queries(pooled, held, previous)
        if state is not None:
            state.queries[adapter_name] = last_query
        return pooled

    def route_queries(self, adapter_name: str, pooled: torch.Tensor) -> torch.Tensor:
        """Map raw pooled queries into the space where anchor keys live. With ``mean_and_token`` the two halves are
        whitened apart and weighted so that a cosine score is ``(1 - w) cos(means) + w cos(tokens)``."""
        settings = self.lemoe_settings[adapter_name]
        mean = self.lemoe_route_mean[adapter_name].float()
        projection = self.lemoe_route_projection[adapter_name].float()
        normalize = settings.similarity == "cosine"
        if settings.pooling != "mean_and_token":
            return whiten(pooled.float(), mean, projection, normalize)
        means, tokens = pooled.float().split(mean.shape[0], dim=-1)
        return torch.cat(
            [
                whiten(means, mean, projection, normalize) * (1 - settings.token_weight) ** 0.5,
                whiten(tokens, mean, projection, normalize) * settings.token_weight**0.5,
            ],
            dim=-1,
        )

    def subject_queries(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Whitened, normalized inputs of single tokens: the space of subject keys (edit time) and of the token
        inputs matched against them (inference)."""
        return whiten(
            x.float(),
            self.lemoe_route_mean[adapter_name].float(),
            self.lemoe_route_projection[adapter_name].float(),
            normalize=True,
        )

    def subject_gate(
        self,
        adapter_name: str,
        x: torch.Tensor,
        counts: torch.Tensor,
        valid: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        named: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Which edited subjects each token of ``x`` (B, T, d_in) has read: (B, T, S) booleans (a subject is read
        once any of its keys is), and the best score of every key after the last token (B, S) to continue from;
        (None, None) when no anchor is gated. ``named`` (B, T, S) says where a key's subject name ends (see
        ``route_subject_names``; None: names are not read)."""
        settings = self.lemoe_settings[adapter_name]
        threshold = settings.subject_threshold
        subjects, alias = self.lemoe_subjects[adapter_name], self.lemoe_subject_alias[adapter_name]
        if threshold is None or subjects.shape[0] == 0:
            return None, None
        by_name = named is not None and settings.subject_names == "only"
        if by_name and not torch.compiler.is_compiling():
            return self._read_by_name(adapter_name, named, prefix)
        if by_name:
            scores = x.new_full(named.shape, float("-inf"), dtype=torch.float32)
        else:
            scores = self.subject_queries(adapter_name, x) @ subjects.float().T
        presence = subject_presence(scores, counts, valid, prefix, settings.subject_margin, named)
        read = presence.new_full(presence.shape, float("-inf"))
        read = read.scatter_reduce(-1, alias.expand_as(presence), presence, reduce="amax")
        return read >= threshold, presence[:, -1]

    def _read_by_name(
        self, adapter_name: str, named: torch.Tensor, prefix: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`subject_gate` where subjects are read by name alone: a key is read from where its name ends on
        (score 1; -inf before). Only the keys named in this call or read before it are computed, so the cost
        follows the names a text holds, not the number of edited subjects (the result is the general path's)."""
        batch, tokens, count = named.shape
        before = named.new_zeros(batch, count) if prefix is None else prefix > float("-inf")
        columns = (named.any(dim=1).any(dim=0) | before.any(dim=0)).nonzero()[:, 0]
        seen = (named[..., columns].cumsum(dim=1) > 0) | before[:, None, columns]  # (B, T, C)
        alias = self.lemoe_subject_alias[adapter_name][columns]
        read = named.new_zeros(batch, tokens, count, dtype=torch.uint8).index_add_(-1, alias, seen.to(torch.uint8))
        presence = torch.full((batch, count), float("-inf"), device=named.device)
        presence[:, columns] = torch.where(seen[:, -1], 1.0, float("-inf"))
        return read > 0, presence

    def route(
        self, adapter_name: str, pooled: torch.Tensor, read: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts (..., T, k) (-1: none) and mixing weights (..., T, k) for raw pooled queries (..., T, d_in);
        ``read`` (..., T, S) says which subjects each token has read (:meth:`subject_gate`), None: no gate.

        A subject once read stays read, so the anchors any token of the call may use are those its last token may:
        only they are scored (exact, and the cost follows the few subjects a text mentions, not the number of
        edits). Under torch.compile every anchor is scored, which keeps the shapes static."""
        settings = self.lemoe_settings[adapter_name]
        keys, owners = self.lemoe_keys[adapter_name], self.lemoe_key_expert[adapter_name]
        thresholds, gated = self.lemoe_key_threshold[adapter_name], self.lemoe_key_subject[adapter_name]
        allowed = None
        if read is not None:
            if not torch.compiler.is_compiling():
                read_by_last = read[..., -1, :].reshape(-1, read.shape[-1]).any(dim=0)
                candidates = ((gated < 0) | read_by_last[gated.clamp_min(0)]).nonzero()[:, 0]
                keys, owners, thresholds, gated = (t[candidates] for t in (keys, owners, thresholds, gated))
            allowed = (gated < 0) | read[..., gated.clamp_min(0)]
        return select_experts(
            self.route_queries(adapter_name, pooled),
            keys.float(),
            owners,
            thresholds.float(),
            self.num_experts(adapter_name),
            settings.top_k,
            settings.temperature,
            allowed,
        )

    def route_sequences(
        self, adapter_name: str, x: torch.Tensor, valid: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts and mixing weights (B, T, k) for whole sequences ``x`` (B, T, d_in), as a forward routes them
        (``ids`` (B, T): their input ids, where subject names are read; None: keys only)."""
        read = self._subjects_read(adapter_name, x, valid, ids)
        return self.route(adapter_name, self.pooled_queries(adapter_name, x, valid, ids), read)

    def anchor_scores(
        self, adapter_name: str, x: torch.Tensor, valid: torch.Tensor | None = None, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Every anchor's score (B, T, N) at each token of whole sequences ``x`` (B, T, d_in), -inf where the
        anchor's subject has not been read yet; thresholds are not applied (:meth:`route_sequences` routes)."""
        read = self._subjects_read(adapter_name, x, valid, ids)
        queries = self.route_queries(adapter_name, self.pooled_queries(adapter_name, x, valid, ids))
        scores = queries @ self.lemoe_keys[adapter_name].float().T
        if read is None:
            return scores
        gated = self.lemoe_key_subject[adapter_name]
        return scores.masked_fill(~((gated < 0) | read[..., gated.clamp_min(0)]), float("-inf"))

    def _subjects_read(
        self, adapter_name: str, x: torch.Tensor, valid: torch.Tensor | None, ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """:meth:`subject_gate`'s subjects read (B, T, S) for whole sequences, names read from ``ids`` if given."""
        named = None
        if ids is not None and self.lemoe_settings[adapter_name].subject_names != "off":
            named, _ = named_subjects(ids, self.lemoe_subject_names[adapter_name], valid)
        return self.subject_gate(adapter_name, x, token_counts(x, valid), valid, named=named)[0]

    def _route_call(
        self, adapter_name: str, x: torch.Tensor, call: dict[str, Any], context: CallContext | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route the tokens of the forward call ``context`` describes, continuing cached generation if any. ``call``
        holds what the adapters of this layer share within one call (queries, token counts, the state to carry)."""
        if not call:
            valid = None if context is None or context.valid is None else context.valid
            valid = valid if valid is not None and valid.shape == x.shape[:2] else None
            prefix = None if context is None else context.prefix.get(id(self))
            prefix = prefix if prefix is not None and prefix.tokens.shape[0] == x.shape[0] else None
            counts = token_counts(x, valid, None if prefix is None else prefix.tokens)
            call.update(
                valid=valid,
                prefix=prefix,
                ids=_ids_of(context, x),
                counts=counts,
                state=RouteState(counts[:, -1:]),
            )
            if context is not None:
                context.updated[id(self)] = call["state"]
        prefix, named = call["prefix"], self._named(adapter_name, call)
        read, presence = self.subject_gate(
            adapter_name,
            x,
            call["counts"],
            call["valid"],
            None if prefix is None else prefix.presence.get(adapter_name),
            named,
        )
        if presence is not None:
            call["state"].presence[adapter_name] = presence
        pooled = self._pooled(adapter_name, x, call["valid"], call["ids"], prefix, call["state"], named)
        experts, weights = self.route(adapter_name, pooled, read)
        if self.lemoe_settings[adapter_name].generated_tokens == "any":
            return experts, weights
        return self._follow_prompt(adapter_name, experts, weights, call)

    def _named(self, adapter_name: str, call: dict[str, Any]) -> torch.Tensor | None:
        """Where the call's ids complete a subject name (B, T, S), continuing the ids of earlier calls; None when
        names are not read (``route_subject_names`` off, or the call passed embeddings)."""
        names, ids = self.lemoe_subject_names[adapter_name], call["ids"]
        if self.lemoe_settings[adapter_name].subject_names == "off" or ids is None:
            return None
        prefix = call["prefix"]
        recent = None if prefix is None else prefix.recent_ids.get(adapter_name)
        recent = recent if recent is not None and recent.shape == (ids.shape[0], names.shape[1] - 1) else None
        named, call["state"].recent_ids[adapter_name] = named_subjects(ids, names, call["valid"], recent)
        return named

    @staticmethod
    def _follow_prompt(
        adapter_name: str, experts: torch.Tensor, weights: torch.Tensor, call: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routes of a generated token (a one-token call continuing a cache) kept to the experts of its prompt's last
        token; any other call is a prompt, routed as it is, whose last routes are kept for the tokens that follow."""
        prefix, state = call["prefix"], call["state"]
        prompt = None if prefix is None or experts.shape[1] != 1 else prefix.prompt_experts.get(adapter_name)
        if prompt is None:
            state.prompt_experts[adapter_name] = last_routes(experts, call["valid"])
            return experts, weights
        state.prompt_experts[adapter_name] = prompt
        return keep_experts(experts, weights, prompt)

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
            valid = None if context is None else context.valid
            inputs = LayerInputs(sequences.detach(), valid, _ids_of(context, sequences))
            self.routing_session.captured[id(self)] = inputs
        if self.disable_adapters:
            return result
        call: dict[str, Any] = {}
        for adapter_name in self.active_adapters:
            if adapter_name not in self.lemoe_keys or self.num_anchors(adapter_name) == 0:
                continue
            experts, weights = self._routing(adapter_name, sequences, call, context)
            delta = self.mix_experts(adapter_name, sequences, experts, weights)
            result = result + delta.reshape(result.shape).to(result.dtype)
        return result

    def _routing(
        self, adapter_name: str, x: torch.Tensor, call: dict[str, Any], context: CallContext | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_route_call` in float32 (also under mixed-precision autocast), or the decision this layer took for
        the same rows in an earlier training step (:class:`RoutingDecisions`)."""
        decisions = self.routing_session.decisions
        key = None
        if decisions is not None and decisions.part is not None and id(self) in decisions.layers:
            key = (id(self), adapter_name, decisions.part)
            stored = decisions.stored.get(key)
            if stored is not None and stored[0].shape[:-1] == x.shape[:-1]:
                return stored
        with torch.autocast(x.device.type, enabled=False):
            routed = self._route_call(adapter_name, x, call, context)
        if key is not None:
            decisions.stored[key] = routed
        return routed

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


@functools.cache
def _chat_table(opening: tuple[int, ...], reply: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """:func:`~lemoe_peft.routing.chat_turn_table` on ``device``, built once per markers and device."""
    return chat_turn_table(opening, reply).to(device)


def _ids_of(context: CallContext | None, x: torch.Tensor) -> torch.Tensor | None:
    """The input ids (B, T) of the forward call ``context`` describes, if it passed ids for the tokens of ``x``."""
    ids = None if context is None else context.ids
    return ids if ids is not None and ids.shape == x.shape[:2] else None


def _is_prefix(kept: torch.Tensor) -> bool:
    """Whether the kept rows are the leading ones (the removed rows are the last)."""
    return bool(kept[: int(kept.sum())].all())


def _kept_rows(stack: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``stack[kept]``; a view without copying when the removed rows are the last ones (the newest expert's)."""
    return stack[: int(kept.sum())] if _is_prefix(kept) else stack[kept]
