"""Training an expert with any loop: open_expert / close_expert around transformers' Trainer on EditDataset and
EditCollator, the same pieces the editor uses."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from lemoe_peft import EditCollator, EditDataset, LEMoEConfig, LEMoEEditor, evaluate_edits
from lemoe_peft.teacher_forcing import encode

from .helpers import CHAT_TEMPLATE, PROJECT_ROOT, tiny_model, tiny_tokenizer
from .test_editor import CALIBRATION, REQUESTS


@pytest.mark.parametrize("chat_form", [False, True])
def test_edit_dataset_labels_only_the_target_tokens_as_teacher_forcing_encodes_them(chat_form):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    forms = ("written", "chat") if chat_form else ("written",)
    batch = encode(tokenizer, [(r.prompt, r.target_new) for r in REQUESTS[:3]], forms)
    collated = EditCollator(tokenizer)(list(EditDataset(REQUESTS[:3], tokenizer, chat_form)))
    assert collated["input_ids"].shape[0] == 3 * len(forms)
    assert torch.equal(collated["input_ids"], batch.input_ids)
    assert torch.equal(collated["attention_mask"], batch.attention_mask)
    labels = collated["labels"]
    assert torch.equal(labels[:, 1:][batch.predicts[:, :-1]], batch.answers), "label t is the answer predicted at t-1"
    assert (labels[:, 1:][~batch.predicts[:, :-1]] == -100).all() and (labels[:, 0] == -100).all()


def test_edit_collator_pads_on_the_left():
    tokenizer = tiny_tokenizer()
    examples = list(EditDataset(REQUESTS[:3], tokenizer))
    right, left = EditCollator(tokenizer)(examples), EditCollator(tokenizer, padding_side="left")(examples)
    for key in ("input_ids", "attention_mask", "labels"):
        for row_right, row_left, mask in zip(right[key], left[key], right["attention_mask"], strict=True):
            assert torch.equal(row_right[mask.bool()], row_left[mask.flip(0).bool()])
    assert (left["attention_mask"][:, -1] == 1).all() and (left["labels"][left["attention_mask"] == 0] == -100).all()


def _editor():
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    return LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION)


def test_an_expert_opened_for_requests_trains_with_trainer_and_closes(tmp_path):
    editor = _editor()
    model, tokenizer, requests = editor.model, editor.tokenizer, REQUESTS[:3]
    expert = editor.open_expert(requests)
    assert expert == 0 and model.peft_config["default"].route_calibration_size > 0
    assert model.peft_config["default"].num_anchors > 0, "the expert has anchors from the requests"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=40,
        per_device_train_batch_size=3,
        learning_rate=3e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
    )
    dataset, collator = EditDataset(requests, tokenizer), EditCollator(tokenizer, padding_side="left")
    Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator).train()
    record = editor.close_expert(trainer="transformers.Trainer")
    assert record["expert"] == expert and record["trainer"] == "transformers.Trainer"
    assert model.peft_config["default"].edit_log == [record]
    assert not any(p.requires_grad for p in model.parameters()), "closing freezes the expert"
    assert evaluate_edits(model, tokenizer, requests)["rewrite_acc"] == 1.0
    assert evaluate_edits(model, tokenizer, REQUESTS[3:])["rewrite_acc"] < 1.0, "other prompts are not edited"


def test_open_and_close_must_alternate():
    editor = _editor()
    with pytest.raises(RuntimeError, match="No expert is open"):
        editor.close_expert()
    editor.open_expert(REQUESTS[:1])
    with pytest.raises(RuntimeError, match="still open"):
        editor.open_expert(REQUESTS[1:2])


def test_two_processes_train_one_expert_to_identical_weights(tmp_path):
    """Two CPU processes (torchrun, gloo; Trainer distributes through accelerate): gradients are all-reduced, so every
    rank ends with the same expert."""
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(PROJECT_ROOT / "tests" / "distributed_expert.py"), str(tmp_path)]
    subprocess.run(command, check=True, env=environment, cwd=PROJECT_ROOT, timeout=300)
    first, second = (load_file(tmp_path / f"rank{rank}-of-2.safetensors") for rank in (0, 1))
    assert first["B"].abs().sum() > 0, "the expert trained (it starts at zero output)"
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_the_finetune_and_edit_example_runs_on_a_tiny_model(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([{"prompt": r.prompt, "target_new": r.target_new} for r in REQUESTS[:2]]))
    sys.path.insert(0, str(PROJECT_ROOT / "examples"))
    try:
        from finetune_and_edit import main
    finally:
        sys.path.pop(0)
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--finetune-steps", "2"]
    metrics = main([*argv, "--edit-steps", "30", "--keep-lora"])  # the stacked route; merging is the simpler one
    assert metrics["rewrite_acc"] == 1.0
    assert all("lora_" in key for key in load_file(out / "lora" / "adapter_model.safetensors"))
    assert all(".lemoe_" in key for key in load_file(out / "lemoe" / "edits" / "adapter_model.safetensors"))


def test_reusing_the_routing_across_training_steps_trains_the_same_expert():
    from lemoe_peft.training import Objective, fit

    trained = []
    for reuse in (False, True):
        editor = _editor()
        editor.open_expert(REQUESTS[:3])
        opened = editor._opened()
        objective = Objective(opened.batch, editor._preserved_positions(0, opened.batch, opened.captured))
        with editor.tuner.reuse_routing() as decisions:
            replay = (lambda rows: decisions.reuse(rows.start)) if reuse else None
            fit(editor.model, editor.trainable_tensors(), objective, max_steps=5, learning_rate=3e-2,
                early_stop_loss=0.0, replay=replay)  # fmt: skip
            assert len(decisions.stored) == (1 if reuse else 0)
        trained.append([t.detach().clone() for t in editor.trainable_tensors()])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))
