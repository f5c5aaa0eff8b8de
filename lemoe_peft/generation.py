"""Greedy generation as users run it (``generate(do_sample=False, use_cache=True)``), batched with left padding, and
the rule that decides whether a generated continuation answers with a target.

Left padding gives the same tokens as generating each prompt alone: transformers derives position ids from the
attention mask, and LEMoE's routing counts only real tokens in its running mean, kept per KV cache and per row
(tests/test_generation.py checks this for the plain model and for an adapter with an expert).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from .models import input_device
from .teacher_forcing import prompt_ids


@dataclass(frozen=True)
class GenerationSettings:
    """How the generation-based metrics generate."""

    extra_tokens: int = 3  # an answer stops at EOS, at a newline, or this many tokens past the target's length
    locality_tokens: int = 8  # a locality prompt's continuation: this many new tokens (or up to EOS)
    batch_size: int = 16  # prompts per left-padded batch

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in a result's protocol."""
        return {
            "decoding": "greedy generate(do_sample=False, use_cache=True), left-padded batches",
            "answer_stop": f"EOS, newline, or {self.extra_tokens} tokens past the target's length",
            "answer_match": "the whitespace-normalized continuation starts with the target, followed by the end or "
            "a non-alphanumeric character",
            "locality_match": f"the first {self.locality_tokens} new tokens equal the unedited model's",
            **asdict(self),
        }


def normalize(text: str) -> str:
    """Strip and collapse whitespace."""
    return " ".join(text.split())


def answers_with(continuation: str, target: str) -> bool:
    """Whether ``continuation`` answers ``target``: after whitespace normalization it starts with the target and the
    target ends there or at a word boundary ("Paris, France" answers "Paris"; "Parisian" does not)."""
    text, target = normalize(continuation), normalize(target)
    return text.startswith(target) and (len(text) == len(target) or not text[len(target)].isalnum())


def answer_text(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int]) -> str:
    """The text of generated ``tokens`` up to the first newline, without special tokens."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).split("\n", 1)[0]


class _StopAtNewline(StoppingCriteria):
    """Marks a row done once its newest token's text holds a newline."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, -1:])
        return torch.tensor(["\n" in text for text in texts], dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [] if configured is None else [configured]
    return sorted({*ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def _truncate(tokens: list[int], limit: int, eos: set[int], newline: _StopAtNewline | None) -> list[int]:
    """``tokens`` cut after ``limit`` tokens, after the first EOS, and (with ``newline``) after the first newline."""
    tokens = tokens[:limit]
    for i, token in enumerate(tokens):
        if token in eos or (newline is not None and "\n" in newline.tokenizer.decode([token])):
            return tokens[: i + 1]
    return tokens


def greedy_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    *,
    stop_at_newline: bool = False,
    batch_size: int = 16,
    progress: str | None = None,
    chat: bool = False,
) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids): at most its ``max_new_tokens`` tokens, ending with the first EOS
    token and (with ``stop_at_newline``) the first token whose text holds a newline. Prompts are tokenized as the
    teacher-forced metrics tokenize them (with ``chat``, sent through the chat template); ``progress`` names a
    progress bar (none when None)."""
    rows = [prompt_ids(tokenizer, prompt, chat) for prompt in prompts]
    return greedy_token_continuations(
        model,
        tokenizer,
        rows,
        max_new_tokens,
        stop_at_newline=stop_at_newline,
        batch_size=batch_size,
        progress=progress,
    )


@torch.no_grad()
def greedy_token_continuations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[list[int]],
    max_new_tokens: Sequence[int],
    *,
    stop_at_newline: bool = False,
    batch_size: int = 16,
    progress: str | None = None,
    first_tokens: torch.Tensor | None = None,
) -> list[list[int]]:
    """:func:`greedy_continuations` of token rows; ``first_tokens`` (vocab,) bool: the tokens the first new token
    is chosen among (all when None)."""
    model.eval()
    device = input_device(model)
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    newline = _StopAtNewline(tokenizer) if stop_at_newline else None
    suppressed = None if first_tokens is None else (~first_tokens).nonzero().flatten().tolist()
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), max_new_tokens[i]))
    results: list[list[int]] = [[] for _ in rows]
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None or not starts, leave=False):
        chunk = order[start : start + batch_size]
        input_ids, attention_mask = _left_padded([rows[i] for i in chunk], pad)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max(max_new_tokens[i] for i in chunk),
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=eos or None,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([newline]) if newline else None,
            begin_suppress_tokens=suppressed,
        )
        for row, i in enumerate(chunk):
            generated = output[row, input_ids.shape[1] :].tolist()
            results[i] = _truncate(generated, max_new_tokens[i], set(eos), newline)
    return results
