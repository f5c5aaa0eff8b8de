"""Teacher-forced batches of ``prompt + " " + answer`` and the logits at the positions that predict the answer.

Answers are tokenized as they appear after the prompt (byte-level BPE tokenizes ``" Andromeda"`` and ``"Andromeda"``
differently), and training and scoring use exactly the same tokens. In the chat form a prompt is sent as a user's
message through the tokenizer's chat template and the answer is the assistant's whole reply, end of turn included.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

Form = Literal["written", "chat"]  # a prompt as written, or sent through the tokenizer's chat template


@dataclass
class TeacherForcedBatch:
    input_ids: torch.Tensor  # (B, L), right-padded
    attention_mask: torch.Tensor  # (B, L)
    predicts: torch.Tensor  # (B, L) bool: positions whose next token is an answer token
    answers: torch.Tensor  # (n,) the answer tokens, in row-major order of `predicts`
    answer_lengths: list[int]  # answer tokens per row

    def token_lists(self) -> list[list[int]]:
        """Each row's tokens, without padding."""
        return [ids[mask.bool()].tolist() for ids, mask in zip(self.input_ids, self.attention_mask, strict=True)]

    def to(self, device: torch.device | str) -> TeacherForcedBatch:
        return TeacherForcedBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.predicts.to(device),
            self.answers.to(device),
            self.answer_lengths,
        )

    def rows(self, start: int, stop: int) -> TeacherForcedBatch:
        """The prompts ``start:stop`` (same padded width, so each row computes exactly as in the whole batch)."""
        first, last = sum(self.answer_lengths[:start]), sum(self.answer_lengths[:stop])
        return TeacherForcedBatch(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.predicts[start:stop],
            self.answers[first:last],
            self.answer_lengths[start:stop],
        )


def join(prompt: str, answer: str) -> str:
    return f"{prompt.rstrip()} {answer.strip()}"


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading items ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, reply: str | None = None) -> str:
    """``prompt`` sent as a user's message through ``tokenizer``'s chat template, up to where the reply begins; with
    a ``reply``, followed by it as the assistant's whole turn (its end-of-turn marker included)."""
    messages = [{"role": "user", "content": prompt.strip()}]
    if reply is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": reply.strip()})
    return tokenizer.apply_chat_template(messages, tokenize=False).rstrip()


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool = False) -> list[int]:
    """The tokens of ``prompt`` as teacher forcing and generation read it: right-stripped, or with ``chat`` sent
    through the chat template (:func:`chat_prompt`, whose text holds any special tokens itself)."""
    if chat:
        return tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    return tokenizer(prompt.rstrip()).input_ids


def split_answer(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, chat: bool = False
) -> tuple[list[int], int]:
    """The tokens of ``prompt + " " + answer`` and the index of the first answer token; with ``chat``, of ``prompt``
    asked through the chat template and ``answer`` as the whole reply, which ends the turn (:func:`chat_prompt`)."""
    if chat:
        full_ids = tokenizer(chat_prompt(tokenizer, prompt, answer), add_special_tokens=False).input_ids
    else:
        full_ids = tokenizer(join(prompt, answer)).input_ids
    start = max(1, common_prefix(prompt_ids(tokenizer, prompt, chat), full_ids))
    if start >= len(full_ids):
        raise ValueError(f"The answer {answer!r} adds no tokens after the prompt {prompt!r}.")
    return full_ids, start


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end-of-sequence token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def encode(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], forms: Sequence[Form] = ("written",)
) -> TeacherForcedBatch:
    """Tokenize (prompt, answer) pairs for teacher forcing, in each of ``forms`` (all pairs written, then all in the
    chat form: see :func:`split_answer`)."""
    rows, predicts, answers, lengths = [], [], [], []
    for form, (prompt, answer) in ((form, pair) for form in forms for pair in pairs):
        full_ids, start = split_answer(tokenizer, prompt, answer, chat=form == "chat")
        rows.append(full_ids)
        predicts.append([start - 1 <= i < len(full_ids) - 1 for i in range(len(full_ids))])
        answers += full_ids[start:]
        lengths.append(len(full_ids) - start)
    return _padded(tokenizer, rows, predicts, answers, lengths)


def with_rows(
    tokenizer: PreTrainedTokenizerBase, batch: TeacherForcedBatch, rows: Sequence[list[int]]
) -> TeacherForcedBatch:
    """``batch`` with extra token rows that predict no answer (e.g. prompts whose predictions must not move)."""
    old, predicts = _unpadded(batch)
    predicts += [[False] * len(ids) for ids in rows]
    return _padded(tokenizer, old + list(rows), predicts, batch.answers.tolist(), batch.answer_lengths)


def with_tails(
    tokenizer: PreTrainedTokenizerBase, batch: TeacherForcedBatch, tails: Sequence[list[int]]
) -> TeacherForcedBatch:
    """``batch`` with tokens appended to each row after its answer; they predict no answer."""
    old, predicts = _unpadded(batch)
    rows = [ids + list(tail) for ids, tail in zip(old, tails, strict=True)]
    predicts = [p + [False] * len(tail) for p, tail in zip(predicts, tails, strict=True)]
    return _padded(tokenizer, rows, predicts, batch.answers.tolist(), batch.answer_lengths)


def _unpadded(batch: TeacherForcedBatch) -> tuple[list[list[int]], list[list[bool]]]:
    rows = batch.token_lists()
    return rows, [p[: len(ids)].tolist() for p, ids in zip(batch.predicts, rows, strict=True)]


def token_rows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[list[int]]) -> TeacherForcedBatch:
    """Right-padded token rows that predict no answer."""
    return _padded(tokenizer, list(rows), [[False] * len(ids) for ids in rows], [], [])


def _padded(tokenizer, rows: list[list[int]], predicts: list[list[bool]], answers: list[int], lengths: list[int]):
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predict_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, predicts, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        predict_mask[i, : len(ids)] = torch.tensor(mask)
    return TeacherForcedBatch(input_ids, attention_mask, predict_mask, torch.tensor(answers), lengths)


def answer_ends(predicts: torch.Tensor) -> torch.Tensor:
    """(B, L) the position of each answer's last token: the one that predicts what follows the answer."""
    ends = torch.zeros_like(predicts)
    ends[:, 1:] = predicts[:, :-1] & ~predicts[:, 1:]
    return ends


def word_boundary_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) bool: the tokens that, after a word, do not continue it (they start with a space, punctuation
    or a newline, or are special tokens such as EOS). Each token is decoded after the word "a", so tokenizers that
    mark a leading space (byte-level BPE's "Ġ", SentencePiece's "▁") are read alike."""
    word = tokenizer("a", add_special_tokens=False).input_ids
    head = len(tokenizer.decode(word))
    ids = range(min(vocab_size, len(tokenizer)))
    texts = tokenizer.batch_decode([[*word, i] for i in ids])
    boundary = torch.zeros(vocab_size, dtype=torch.bool)
    boundary[: len(texts)] = torch.tensor([not text[head:][:1].isalnum() for text in texts])
    return boundary


def token_position(tokenizer: PreTrainedTokenizerBase, text: str, end: int) -> int:
    """Index of the token of ``tokenizer(text)`` that holds character ``end - 1`` (the last of a span)."""
    if tokenizer.is_fast:
        offsets = tokenizer(text, return_offsets_mapping=True).offset_mapping
        return max(i for i, (start, stop) in enumerate(offsets) if start < end and stop > start)
    return len(tokenizer(text[:end]).input_ids) - 1


def span_tokens(tokenizer: PreTrainedTokenizerBase, text: str, start: int, end: int) -> list[int]:
    """The ids of the tokens of ``tokenizer(text)`` that hold characters ``start`` to ``end - 1``."""
    first, last = token_position(tokenizer, text, start + 1), token_position(tokenizer, text, end)
    return tokenizer(text).input_ids[first : last + 1]


def subject_spellings(tokenizer: PreTrainedTokenizerBase, subject: str) -> list[list[int]]:
    """The ids of ``subject`` within a sentence (after a space) and as a text's first word: most tokenizers write
    the two differently ("Munich" against " Munich")."""
    lead = "It is about "
    return [
        span_tokens(tokenizer, lead + subject, len(lead), len(lead) + len(subject)),
        tokenizer(subject, add_special_tokens=False).input_ids,
    ]


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    forward = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    return "logits_to_keep" in inspect.signature(forward).parameters


def position_logits(model: nn.Module, batch: TeacherForcedBatch, positions: torch.Tensor) -> torch.Tensor:
    """Logits (n, vocab) at ``positions`` (B, L) in row-major order; only those are projected when possible."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = positions  # a boolean mask: transformers projects only these positions
    logits = model(**kwargs).logits
    return logits if logits.dim() == 2 else logits[positions]


def answer_logits(model: nn.Module, batch: TeacherForcedBatch) -> torch.Tensor:
    """Logits (n, vocab) at the positions that predict answer tokens."""
    return position_logits(model, batch, batch.predicts)
