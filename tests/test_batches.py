"""Large edit batches go through the model a few prompts at a time: the gradient, and so the trained expert, equals
that of the whole batch in one pass."""

import functools

import torch
from peft import get_peft_model

from lemoe_peft import LEMoEConfig, LEMoEEditor, editor, training

from .helpers import tiny_model, tiny_tokenizer
from .test_editor import REQUESTS


def _edit(monkeypatch, rows_per_pass: int):
    monkeypatch.setattr(editor, "fit", functools.partial(training.fit, rows_per_pass=rows_per_pass))
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    report = LEMoEEditor(model, tiny_tokenizer(), batch_size=8, max_steps=6, early_stop_loss=0).edit(
        REQUESTS, progress=False
    )
    (layer,) = model.base_model.lemoe_layers().values()
    return report.batches[0], layer.newest_expert("default")


def test_a_batch_trained_in_parts_equals_the_batch_in_one_pass(monkeypatch):
    whole, expert = _edit(monkeypatch, rows_per_pass=32)
    parts, expert_in_parts = _edit(monkeypatch, rows_per_pass=3)
    assert whole["steps"] == parts["steps"] == 6
    assert abs(whole["final_loss"] - parts["final_loss"]) < 1e-4
    for tensor, in_parts in zip(expert, expert_in_parts, strict=True):  # up to float32 summation order (1e-5 here)
        assert torch.allclose(tensor, in_parts, atol=1e-4)


def test_mixed_precision_training_with_weight_copies_equals_autocast_and_restores_the_weights(monkeypatch):
    import contextlib

    def train(copies: bool):
        if not copies:
            monkeypatch.setattr(training, "frozen_weights_in", lambda model, dtype: contextlib.nullcontext())
        model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
        weights = {name: p for name, p in model.named_parameters() if ".lemoe_" not in name}  # the frozen model
        LEMoEEditor(model, tiny_tokenizer(), batch_size=8, max_steps=4, early_stop_loss=0, train_dtype="bfloat16").edit(
            REQUESTS, progress=False
        )
        after = {name: p for name, p in model.named_parameters() if ".lemoe_" not in name}
        assert after.keys() == weights.keys() and all(after[n] is p for n, p in weights.items()), "originals back"
        assert all(p.dtype == torch.float32 for p in after.values())
        (layer,) = model.base_model.lemoe_layers().values()
        return layer.newest_expert("default")

    with_copies = train(copies=True)
    plain = train(copies=False)
    assert all(torch.equal(a, b) for a, b in zip(with_copies, plain, strict=True)), "the same bf16 products"
