"""The field's editing metrics, computed as EasyEdit defines them.

* Reliability ``rewrite_acc``: teacher-forced token accuracy of ``target_new`` after the edit prompt.
* Generality ``rephrase_acc``: the same after each rephrased prompt.
* Locality ``locality_acc``: on each locality prompt + its answer, the share of answer positions where the edited
  model's argmax prediction equals the unedited model's.
* Portability ``portability_acc``: teacher-forced token accuracy of each portability answer.

Every result carries its protocol (when it was taken, stream length T, and whatever the caller adds: batch size,
seed, model, data), because numbers taken under different protocols are not comparable.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Mapping, Sequence
from statistics import mean
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .requests import EditRequest
from .teacher_forcing import answer_logits, encode

METRICS = ("rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc")


@torch.no_grad()
def predicted_tokens(
    model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 32, progress: str | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (prompt, answer): the model's argmax tokens at the answer positions and the answer tokens.
    ``progress`` names a progress bar (none when None)."""
    device = next(model.parameters()).device
    results = []
    starts = range(0, len(pairs), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None or not starts, leave=False):
        batch = encode(tokenizer, pairs[start : start + batch_size]).to(device)
        predictions = answer_logits(model, batch).argmax(dim=-1).cpu()
        results += zip(
            predictions.split(batch.answer_lengths), batch.answers.cpu().split(batch.answer_lengths), strict=True
        )
    return results


def _locality_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    return [(probe.prompt, probe.answer) for request in requests for probe in request.locality]


def locality_reference(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest]
) -> list[torch.Tensor]:
    """The unedited model's argmax tokens on every locality probe (compute it before editing a model in place)."""
    return [tokens for tokens, _ in predicted_tokens(model, tokenizer, _locality_pairs(requests))]


@contextlib.contextmanager
def _adapters_disabled(model: nn.Module) -> Iterator[None]:
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "Locality compares against the unedited model: pass `reference=locality_reference(base_model, ...)` "
            "when the edited model is not a PEFT model."
        )
    with model.disable_adapter():
        yield


def evaluate_edits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    reference: Sequence[torch.Tensor] | None = None,
    protocol: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, Any]:
    """Score ``requests`` on ``model``: per-case records, the mean of each metric, and the protocol.

    ``reference`` holds the unedited model's locality predictions (:func:`locality_reference`); for a PEFT model it
    is computed here with the adapters disabled. A metric whose probes are absent from every request is omitted.
    """
    model.eval()
    if reference is None and any(r.locality for r in requests):
        with _adapters_disabled(model):
            reference = locality_reference(model, tokenizer, requests)

    def predict(pairs: list[tuple[str, str]], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return predicted_tokens(model, tokenizer, pairs, batch_size, f"scoring {name}" if progress else None)

    def accuracies(pairs: list[tuple[str, str]], name: str) -> list[float]:
        return [(p == a).float().mean().item() for p, a in predict(pairs, name)]

    rewrite = accuracies([(r.prompt, r.target_new) for r in requests], "reliability")
    rephrase = iter(accuracies([(p, r.target_new) for r in requests for p in r.rephrase_prompts], "generality"))
    portability = iter(accuracies([(p.prompt, p.answer) for r in requests for p in r.portability], "portability"))
    edited_locality = iter(predict(_locality_pairs(requests), "locality"))
    base_locality = iter(reference or [])

    cases = []
    for request, rewrite_acc in zip(requests, rewrite, strict=True):
        case: dict[str, Any] = {"prompt": request.prompt, "target_new": request.target_new, "rewrite_acc": rewrite_acc}
        if request.rephrase_prompts:
            case["rephrase_acc"] = mean(next(rephrase) for _ in request.rephrase_prompts)
        if request.locality:
            agreement = [
                (next(edited_locality)[0] == next(base_locality)).float().mean().item() for _ in request.locality
            ]
            case["locality_acc"] = mean(agreement)
        if request.portability:
            case["portability_acc"] = mean(next(portability) for _ in request.portability)
        cases.append(case)

    summary = {
        metric: mean(c[metric] for c in cases if metric in c) for metric in METRICS if any(metric in c for c in cases)
    }
    summary["protocol"] = {
        "evaluated": "after_stream",
        "T": len(requests),
        "taken_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(protocol or {}),
    }
    summary["cases"] = cases
    return summary
