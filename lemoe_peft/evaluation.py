"""The field's editing metrics, computed as EasyEdit defines them.

* Reliability ``rewrite_acc``: teacher-forced token accuracy of ``target_new`` after the edit prompt.
* Generality ``rephrase_acc``: the same after each rephrased prompt.
* Locality ``locality_acc``: on each locality prompt + its answer, the share of answer positions where the edited
  model's argmax prediction equals the unedited model's.
* Portability ``portability_acc``: teacher-forced token accuracy of each portability answer.

Users do not teacher-force: they read what ``generate()`` answers. Beside each metric above, a generation-based one
(``rewrite_gen_acc``, ``rephrase_gen_acc``, ``portability_gen_acc``) is the share of prompts whose greedy, cached
continuation answers with the target (:func:`lemoe_peft.generation.answers_with`; generation stops at EOS, a
newline, or a few tokens past the target's length), and ``locality_gen_acc`` is the share of locality prompts whose
first ``locality_tokens`` greedy tokens equal the unedited model's.

Some data sets' locality probes restate the edited fact (KnowEdit's ZsRE asks "The constellation of NGC 6604 is"
after editing "Which constellation is NGC 6604 in?"): they name the edit's subject and their answer is its
``ground_truth``, and an edit that generalizes must change it. In a long stream a probe can also ask another
edit's fact (CounterFact's neighbours share their edit's relation; after 10,000 edits of its training split, 11% of
them were edited too). ``locality_other_acc`` / ``locality_other_gen_acc`` score only the probes that ask none of
the edited facts.

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

from .generation import GenerationSettings, answer_text, answers_with, greedy_continuations, normalize
from .models import input_device
from .requests import EditRequest, Probe
from .teacher_forcing import answer_logits, encode, split_answer

METRICS = ("rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc")
GENERATION_METRICS = ("rewrite_gen_acc", "rephrase_gen_acc", "locality_gen_acc", "portability_gen_acc")
OTHER_LOCALITY = {"locality_acc": "locality_other_acc", "locality_gen_acc": "locality_other_gen_acc"}


def restates_edit(request: EditRequest, probe: Probe) -> bool:
    """Whether a locality ``probe`` asks the fact ``request`` edits: it names the request's subject and its answer
    is the request's ``ground_truth`` (CounterFact's neighbours share the answer but name another subject). A request
    without a subject or a ground truth restates nothing."""
    if request.subject is None or request.ground_truth is None:
        return False
    return (
        _normalized(probe.answer) == _normalized(request.ground_truth)
        and request.subject.lower() in probe.prompt.lower()
    )


def _normalized(text: str) -> str:
    return normalize(text).lower()


def _restated_probes(requests: Sequence[EditRequest], edits: Sequence[EditRequest]) -> list[list[bool]]:
    """Per request and locality probe: whether the probe asks the fact of any of ``edits``."""
    by_answer: dict[str, list[EditRequest]] = {}
    for edit in edits:
        if edit.ground_truth is not None:
            by_answer.setdefault(_normalized(edit.ground_truth), []).append(edit)
    return [
        [
            any(restates_edit(edit, probe) for edit in by_answer.get(_normalized(probe.answer), ()))
            for probe in r.locality
        ]
        for r in requests
    ]


@torch.no_grad()
def predicted_tokens(
    model: nn.Module,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
    progress: str | None = None,
    chat: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (prompt, answer): the model's argmax tokens at the answer positions and the answer tokens (with
    ``chat``, the prompt sent through the chat template and the answer as the whole reply). ``progress`` names a
    progress bar (none when None)."""
    device = input_device(model)
    results = []
    starts = range(0, len(pairs), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None or not starts, leave=False):
        batch = encode(tokenizer, pairs[start : start + batch_size], ("chat",) if chat else ("written",)).to(device)
        predictions = answer_logits(model, batch).argmax(dim=-1).cpu()
        results += zip(
            predictions.split(batch.answer_lengths), batch.answers.cpu().split(batch.answer_lengths), strict=True
        )
    return results


def _locality_pairs(requests: Sequence[EditRequest]) -> list[tuple[str, str]]:
    return [(probe.prompt, probe.answer) for request in requests for probe in request.locality]


def locality_reference(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], chat: bool = False
) -> list[torch.Tensor]:
    """The unedited model's argmax tokens on every locality probe (compute it before editing a model in place)."""
    return [tokens for tokens, _ in predicted_tokens(model, tokenizer, _locality_pairs(requests), chat=chat)]


def locality_generation_reference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    settings: GenerationSettings | None = None,
    progress: str | None = None,
    chat: bool = False,
) -> list[list[int]]:
    """The unedited model's greedy continuation (token ids) of every locality prompt, for ``locality_gen_acc``
    (compute it before editing a model in place, with the settings the evaluation will use)."""
    settings = settings or GenerationSettings()
    prompts = [prompt for prompt, _ in _locality_pairs(requests)]
    budgets = [settings.locality_tokens] * len(prompts)
    return greedy_continuations(
        model, tokenizer, prompts, budgets, batch_size=settings.batch_size, progress=progress, chat=chat
    )


def generated_answer_hits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    settings: GenerationSettings | None = None,
    progress: str | None = None,
    chat: bool = False,
) -> list[bool]:
    """For each (prompt, answer): whether the greedy continuation of the prompt (with ``chat``, sent through the chat
    template) answers with ``answer``."""
    settings = settings or GenerationSettings()
    splits = (split_answer(tokenizer, *pair, chat=chat) for pair in pairs)
    budgets = [len(ids) - start + settings.extra_tokens for ids, start in splits]
    prompts = [prompt for prompt, _ in pairs]
    continuations = greedy_continuations(
        model,
        tokenizer,
        prompts,
        budgets,
        stop_at_newline=True,
        batch_size=settings.batch_size,
        progress=progress,
        chat=chat,
    )
    return [
        answers_with(answer_text(tokenizer, tokens), answer)
        for tokens, (_, answer) in zip(continuations, pairs, strict=True)
    ]


@contextlib.contextmanager
def _adapters_disabled(model: nn.Module) -> Iterator[None]:
    if not hasattr(model, "disable_adapter"):
        raise ValueError(
            "Locality compares against the unedited model: pass `reference=locality_reference(base_model, ...)` "
            "and `generation_reference=locality_generation_reference(base_model, ...)` (or `generation=False`) when "
            "the edited model is not a PEFT model."
        )
    with model.disable_adapter():
        yield


def _generation_settings(generation: bool | GenerationSettings) -> GenerationSettings | None:
    if isinstance(generation, GenerationSettings):
        return generation
    return GenerationSettings() if generation else None


def evaluate_edits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    reference: Sequence[torch.Tensor] | None = None,
    generation_reference: Sequence[Sequence[int]] | None = None,
    generation: bool | GenerationSettings = True,
    protocol: Mapping[str, Any] | None = None,
    edits: Sequence[EditRequest] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    chat: bool = False,
) -> dict[str, Any]:
    """Score ``requests`` on ``model``: per-case records, the mean of each metric, and the protocol.

    ``reference`` holds the unedited model's locality predictions (:func:`locality_reference`) and
    ``generation_reference`` its greedy locality continuations (:func:`locality_generation_reference`); for a PEFT
    model, a missing one is computed here with the adapters disabled. ``generation=False`` skips the
    generation-based metrics (they take longer); a :class:`GenerationSettings` configures them. ``edits`` are all
    the edits the model holds, whose facts the ``locality_other`` metrics leave out (default: ``requests``; pass them
    when scoring a sample of a stream). With ``chat`` every prompt is sent as a user's message through the
    tokenizer's chat template and every answer is the whole reply, as users of an instruct model ask (the
    references must then be taken with ``chat`` too). A metric whose probes are absent from every request is omitted.
    """
    model.eval()
    settings = _generation_settings(generation)
    has_locality = any(r.locality for r in requests)
    if has_locality and (reference is None or (settings is not None and generation_reference is None)):
        with _adapters_disabled(model):
            if reference is None:
                reference = locality_reference(model, tokenizer, requests, chat)
            if settings is not None and generation_reference is None:
                generation_reference = locality_generation_reference(
                    model, tokenizer, requests, settings, "generating locality (unedited)" if progress else None, chat
                )

    def predict(pairs: list[tuple[str, str]], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return predicted_tokens(model, tokenizer, pairs, batch_size, f"scoring {name}" if progress else None, chat)

    def accuracies(pairs: list[tuple[str, str]], name: str) -> list[float]:
        return [(p == a).float().mean().item() for p, a in predict(pairs, name)]

    rewrite_pairs = [(r.prompt, r.target_new) for r in requests]
    rephrase_pairs = [(p, r.target_new) for r in requests for p in r.rephrase_prompts]
    portability_pairs = [(p.prompt, p.answer) for r in requests for p in r.portability]
    scores = {
        "rewrite_acc": iter(accuracies(rewrite_pairs, "reliability")),
        "rephrase_acc": iter(accuracies(rephrase_pairs, "generality")),
        "portability_acc": iter(accuracies(portability_pairs, "portability")),
    }
    edited_locality = predict(_locality_pairs(requests), "locality")
    scores["locality_acc"] = iter(
        (edited[0] == base).float().mean().item() for edited, base in zip(edited_locality, reference or [], strict=True)
    )
    if settings is not None:

        def hits(pairs: list[tuple[str, str]], name: str) -> Iterator[float]:
            label = f"generating {name}" if progress else None
            return iter(map(float, generated_answer_hits(model, tokenizer, pairs, settings, label, chat)))

        scores["rewrite_gen_acc"] = hits(rewrite_pairs, "reliability")
        scores["rephrase_gen_acc"] = hits(rephrase_pairs, "generality")
        scores["portability_gen_acc"] = hits(portability_pairs, "portability")
        edited_generation = locality_generation_reference(
            model, tokenizer, requests, settings, "generating locality" if progress else None, chat
        )
        scores["locality_gen_acc"] = iter(
            float(edited == list(base))
            for edited, base in zip(edited_generation, generation_reference or [], strict=True)
        )

    probes_per_metric = {
        "rewrite": lambda r: 1,
        "rephrase": lambda r: len(r.rephrase_prompts),
        "locality": lambda r: len(r.locality),
        "portability": lambda r: len(r.portability),
    }
    restated = _restated_probes(requests, requests if edits is None else edits)
    cases = []
    for request, restated_here in zip(requests, restated, strict=True):
        case: dict[str, Any] = {"prompt": request.prompt, "target_new": request.target_new}
        for metric in (*METRICS, *GENERATION_METRICS):
            count = probes_per_metric[metric.split("_")[0]](request)
            if metric in scores and count:
                values = [next(scores[metric]) for _ in range(count)]
                case[metric] = mean(values)
                if metric in OTHER_LOCALITY:
                    other = [v for v, asked in zip(values, restated_here, strict=True) if not asked]
                    if other:
                        case[OTHER_LOCALITY[metric]] = mean(other)
        cases.append(case)

    summary = {
        metric: mean(c[metric] for c in cases if metric in c)
        for metric in (*METRICS, *GENERATION_METRICS, *OTHER_LOCALITY.values())
        if any(metric in c for c in cases)
    }
    summary["protocol"] = {
        "evaluated": "after_stream",
        "T": len(requests),
        "taken_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generation": settings.describe() if settings is not None else None,
        "prompts": "through the chat template" if chat else "as written",
        **(protocol or {}),
    }
    summary["cases"] = cases
    return summary
