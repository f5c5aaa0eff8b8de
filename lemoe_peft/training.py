"""The optimisation of one batch of edits, shared by the editor and the benchmark baselines so that every method is
trained the same way: Adam on the given parameters, cross-entropy on the target tokens (teacher forcing), an
optional term that keeps the model's previous next-token distribution at other positions, early stop on the loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .teacher_forcing import TeacherForcedBatch, position_logits


@dataclass
class Objective:
    batch: TeacherForcedBatch
    preserve: torch.Tensor | None = None  # (B, L) positions whose next-token distribution must not move
    preserve_weight: float = 1.0

    def positions(self) -> torch.Tensor:
        return self.batch.predicts if self.preserve is None else self.batch.predicts | self.preserve


def fit(
    model: nn.Module,
    parameters: list[nn.Parameter],
    objective: Objective,
    *,
    max_steps: int,
    learning_rate: float,
    early_stop_loss: float,
    replay: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[int, float]:
    """Train ``parameters`` until the target cross-entropy reaches ``early_stop_loss`` or ``max_steps`` updates were
    made. ``replay`` (a context-manager factory, e.g. ``LowerLayerReplay.replay``) wraps every forward.
    Returns the number of updates and the final target loss."""
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    positions = objective.positions()
    is_answer = objective.batch.predicts[positions]
    reference = None
    target_loss = float("inf")
    for step in range(max_steps + 1):
        with replay() if replay is not None else contextlib.nullcontext():
            logits = position_logits(model, objective.batch, positions).float()
        loss = F.cross_entropy(logits[is_answer], objective.batch.answers)
        target_loss = loss.item()
        if objective.preserve is not None and objective.preserve.any():
            log_probs = logits[~is_answer].log_softmax(dim=-1)
            if reference is None:  # the first forward is the model before this batch's update
                reference = log_probs.detach()
            kl = F.kl_div(log_probs, reference, log_target=True, reduction="batchmean")
            loss = loss + objective.preserve_weight * kl
        if target_loss <= early_stop_loss or step == max_steps:
            return step, target_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return max_steps, target_loss
