"""The optimisation of one batch of edits, shared by the editor and the benchmark baselines so that every method is
trained the same way: Adam on the given parameters, cross-entropy on the target tokens (teacher forcing), optional
terms that end each answer at a word boundary and that keep the model's previous next-token distribution at other
positions, early stop on the answer loss."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .teacher_forcing import TeacherForcedBatch, answer_ends, position_logits


@dataclass
class Objective:
    batch: TeacherForcedBatch
    preserve: torch.Tensor | None = None  # (B, L) positions whose next-token distribution must not move
    preserve_weight: float = 1.0
    # (vocab,) bool: tokens that may follow a complete answer (word_boundary_tokens); when set, the token after each
    # answer is trained to be one of them, as one more answer token (else "Titan" may generate on into "Titania")
    answer_end: torch.Tensor | None = None

    def ends(self) -> torch.Tensor:
        """(B, L) the positions whose next token must end the answer (none without ``answer_end``)."""
        predicts = self.batch.predicts
        return answer_ends(predicts) if self.answer_end is not None else torch.zeros_like(predicts)

    def positions(self) -> torch.Tensor:
        positions = self.batch.predicts | self.ends()
        return positions if self.preserve is None else positions | self.preserve

    def split(self, rows: int) -> list[tuple[slice, Objective]]:
        """The objective of each run of ``rows`` prompts, with the slice of the batch it covers."""
        size = self.batch.input_ids.shape[0]
        return [
            (
                slice(start, start + rows),
                Objective(
                    self.batch.rows(start, start + rows),
                    None if self.preserve is None else self.preserve[start : start + rows],
                    self.preserve_weight,
                    self.answer_end,
                ),
            )
            for start in range(0, size, rows)
        ]


def fit(
    model: nn.Module,
    parameters: list[nn.Parameter],
    objective: Objective,
    *,
    max_steps: int,
    learning_rate: float,
    early_stop_loss: float,
    replay: Callable[[slice], contextlib.AbstractContextManager] | None = None,
    rows_per_pass: int = 32,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[int, float]:
    """Train ``parameters`` until the answer loss (the target tokens' cross-entropy, with each answer's end when the
    objective asks for it) reaches ``early_stop_loss`` or ``max_steps`` updates were made. ``replay`` (a
    context-manager factory taking the rows of the batch, e.g. ``LowerLayerReplay.replay``) wraps every forward. A
    batch goes through the model ``rows_per_pass`` prompts at a time, accumulating the gradient of
    the whole batch's loss, so a batch of 1,000 edits needs the activation memory of 32. ``autocast_dtype`` runs the
    forward passes in mixed precision (``torch.autocast``; routing stays float32, the parameters and losses too).
    Returns the number of updates and the final answer loss."""
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=learning_rate)
    parts = [(rows, part, _Shares(part, objective)) for rows, part in objective.split(rows_per_pass)]
    references: list[torch.Tensor | None] = [None] * len(parts)
    target_loss = float("inf")
    with frozen_weights_in(model, autocast_dtype):  # one cast per batch instead of one per forward pass
        for step in range(max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            target_loss, loss = 0.0, None
            for index, (rows, part, shares) in enumerate(parts):
                if loss is not None:  # every run but the last backpropagates at once, freeing its activations
                    loss.backward()
                device = part.batch.input_ids.device.type
                with (
                    replay(rows) if replay is not None else contextlib.nullcontext(),
                    torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None),
                ):
                    logits = position_logits(model, part.batch, shares.positions).float()
                answer_loss = F.cross_entropy(logits[shares.is_answer], part.batch.answers, reduction="none")
                if shares.is_end.any():  # -log P(the next token ends the word)
                    ending = logits[shares.is_end]
                    not_ended = ending.logsumexp(-1) - ending[:, objective.answer_end].logsumexp(-1)
                    answer_loss = torch.cat([answer_loss, not_ended])
                cross_entropy = answer_loss.mean()
                target_loss += cross_entropy.item() * shares.answers
                loss = cross_entropy * shares.answers
                if shares.is_preserved.any():
                    log_probs = logits[shares.is_preserved].log_softmax(dim=-1)
                    if references[index] is None:  # the first forward is the model before this batch's update
                        references[index] = log_probs.detach()
                    kl = F.kl_div(log_probs, references[index], log_target=True, reduction="batchmean")
                    loss = loss + objective.preserve_weight * kl * shares.preserved
            if target_loss <= early_stop_loss or step == max_steps:
                return step, target_loss
            loss.backward()
            optimizer.step()
    return max_steps, target_loss


@contextlib.contextmanager
def frozen_weights_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Within this context every frozen float32 linear layer of ``model`` computes with a copy of its weight and bias
    in ``dtype``, made the first time the layer runs (layers that never run cost nothing); the originals are back
    afterwards. Autocast casts frozen weights again on every forward pass (it caches only trainable ones), which on
    a CPU takes longer than the matrix product itself; the products are the same."""
    if dtype is None:
        yield
        return
    originals: dict[nn.Module, dict[str, nn.Parameter]] = {}

    def use_copy(module: nn.Module, args: tuple) -> None:
        if module not in originals:
            originals[module] = {n: p for n in ("weight", "bias") if (p := getattr(module, n)) is not None}
            for name, parameter in originals[module].items():
                setattr(module, name, nn.Parameter(parameter.detach().to(dtype), requires_grad=False))

    linears = [
        module
        for module in model.modules()
        if isinstance(module, nn.Linear)
        and module.weight.dtype == torch.float32
        and not module.weight.requires_grad
        and module.weight.device.type != "meta"
        and not hasattr(module, "_hf_hook")  # accelerate loads offloaded weights itself on every call
    ]
    handles = [module.register_forward_pre_hook(use_copy) for module in linears]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, parameters in originals.items():
            for name, parameter in parameters.items():
                setattr(module, name, parameter)


class _Shares:
    """A part's positions (answer tokens, answer ends, preserved), and its share of the whole batch's answer tokens
    and ends and of its preserved positions (the weights that make the sum of the parts' mean losses the whole
    batch's mean loss; 1.0 for a batch in one part)."""

    def __init__(self, part: Objective, whole: Objective) -> None:
        self.positions = part.positions()
        self.is_answer = part.batch.predicts[self.positions]
        self.is_end = part.ends()[self.positions]
        self.is_preserved = ~(self.is_answer | self.is_end)
        answered = whole.batch.predicts | whole.ends()
        self.answers = (self.is_answer | self.is_end).sum().item() / answered.sum().item()
        preserved = (whole.positions() & ~answered).sum().item()
        self.preserved = self.is_preserved.sum().item() / max(preserved, 1)
