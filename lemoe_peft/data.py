"""Edit requests as causal-LM training data, for transformers' ``Trainer``, accelerate or any training loop.

``EditDataset`` tokenizes each request as the editor and the evaluation do (``prompt + " " + target_new``, the target
tokenized as it appears after the prompt) with labels on the target tokens only; ``EditCollator`` pads examples
into a batch. Together with :meth:`LEMoEEditor.open_expert` and :meth:`LEMoEEditor.close_expert` they train one
expert with any loop::

    editor.open_expert(requests)
    Trainer(model, args, train_dataset=EditDataset(requests, tokenizer), data_collator=EditCollator(tokenizer)).train()
    editor.close_expert()
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from .requests import EditRequest
from .teacher_forcing import pad_token_id, split_answer

IGNORE_INDEX = -100  # the label transformers' causal-LM losses skip


class EditDataset(torch.utils.data.Dataset):
    """One example per request: ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the target tokens;
    causal LMs shift labels themselves); with ``chat_form``, a second one per request in the chat form (the prompt
    sent through the chat template, the target as the reply), after all the written ones, as the editor's
    ``chat_form`` trains."""

    def __init__(
        self,
        requests: Iterable[EditRequest | Mapping[str, Any]],
        tokenizer: PreTrainedTokenizerBase,
        chat_form: bool = False,
    ) -> None:
        requests = [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in requests]
        self.examples = []
        for chat in (False, True) if chat_form else (False,):
            for request in requests:
                ids, start = split_answer(tokenizer, request.prompt, request.target_new, chat)
                labels = [IGNORE_INDEX] * start + ids[start:]
                self.examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class EditCollator:
    """Pads :class:`EditDataset` examples to a batch of tensors: ``input_ids`` with the tokenizer's pad token (else
    its end-of-sequence token), ``attention_mask`` with 0, ``labels`` with -100; on the right by default."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, padding_side: Literal["right", "left"] = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        self.pad_id = pad_token_id(tokenizer)
        self.padding_side = padding_side

    def __call__(self, examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(example["input_ids"]) for example in examples)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key, value in fill.items():
            rows = []
            for example in examples:
                padding = [value] * (width - len(example[key]))
                rows.append(padding + list(example[key]) if self.padding_side == "left" else [*example[key], *padding])
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch
