"""The editor on a tiny model: edits stick, routing is the same in training and generation, streams survive
crashes, batches can be undone, and editing continues after a reload."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lemoe_peft import LEMoEConfig, LEMoEEditor, chat_markers, token_marks
from lemoe_peft.editor import EditorSettings
from lemoe_peft.evaluation import evaluate_edits
from lemoe_peft.inspection import which_expert
from lemoe_peft.requests import EditRequest, Probe
from lemoe_peft.teacher_forcing import answer_ends, encode, word_boundary_tokens

from .helpers import CALIBRATION, CHAT_TEMPLATE, FACTS, tiny_model, tiny_tokenizer

REQUESTS = [
    EditRequest(prompt, target, rephrase_prompts=(rephrase,), locality=(Probe("what colour is the sky", "blue"),))
    for prompt, target, rephrase in FACTS
]
SETTINGS = {"batch_size": 3, "max_steps": 80, "learning_rate": 3e-2, "early_stop_loss": 0.01}


def new_model():
    return get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))


def edit(model, requests=REQUESTS, **kwargs):
    return LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION, **SETTINGS).edit(requests, **kwargs)


@pytest.fixture(scope="module")
def edited():
    model = new_model()
    report = edit(model, progress=False)
    return model, report


def test_edits_are_reliable_and_logged(edited):
    model, report = edited
    results = evaluate_edits(model, tiny_tokenizer(), REQUESTS)
    assert results["rewrite_acc"] == 1.0
    assert results["protocol"]["T"] == len(REQUESTS)
    assert report.num_edits == len(REQUESTS) and len(report.batches) == 3
    config = model.peft_config["default"]
    assert config.num_experts == 3 and [b["expert"] for b in config.edit_log] == [0, 1, 2]
    record = config.edit_log[0]
    assert record["settings"]["batch_size"] == 3 and record["time"] and record["steps"] >= 1
    assert all("fingerprint" in r and r["target_new"] for b in config.edit_log for r in b["requests"])


def test_generation_produces_the_edited_targets(edited):
    model, _ = edited
    tokenizer = tiny_tokenizer()
    for request in REQUESTS:
        prompt = tokenizer(request.prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
        assert tokenizer.decode(out[0, -1:]) == request.target_new


def test_inspect_names_the_expert_holding_a_fact(edited):
    model, _ = edited
    expert = next(
        b["expert"]
        for b in model.peft_config["default"].edit_log
        for r in b["requests"]
        if r["prompt"] == "who wrote hamlet"
    )
    result = which_expert(model, tiny_tokenizer(), "who wrote hamlet")
    assert result["edited_in_expert"] == expert
    (route,) = result["layers"].values()
    assert route["expert"] == expert
    (layer,) = model.base_model.lemoe_layers().values()
    thresholds = layer.lemoe_key_threshold["default"]
    assert float(thresholds.min()) <= route["score"] <= route["nearest_anchor"] + 1e-6, "an open anchor, above its bar"


def test_inspect_before_any_edit_names_no_expert():
    result = which_expert(new_model(), tiny_tokenizer(), "who wrote hamlet")
    assert result["edited_in_expert"] is None
    assert [route["expert"] for route in result["layers"].values()] == [None]


def test_order_planning_is_deterministic_and_switchable():
    model = new_model()
    editor = LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION, plan_order=True, **SETTINGS)
    editor.ensure_calibrated()
    planned = [[r.prompt for r in batch] for batch in editor.plan(REQUESTS)]
    assert planned == [[r.prompt for r in batch] for batch in editor.plan(REQUESTS)]
    assert sorted(p for batch in planned for p in batch) == sorted(r.prompt for r in REQUESTS)
    plain = LEMoEEditor(model, tiny_tokenizer(), batch_size=3).plan(REQUESTS)  # the default: arrival order
    assert [r.prompt for r in plain[0]] == [f[0] for f in FACTS[:3]]


@pytest.mark.parametrize("restart", ["sentence", "off"])
def test_the_editor_gives_the_adapter_its_tokenizers_marks_before_calibrating(restart):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_restart=restart))
    LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION, **SETTINGS).ensure_calibrated()
    (layer,) = model.base_model.lemoe_layers().values()
    expected = token_marks(tiny_tokenizer()) if restart == "sentence" else torch.zeros(0, dtype=torch.uint8)
    assert torch.equal(layer.lemoe_token_marks["default"], expected)
    assert model.peft_config["default"].route_vocab_size == len(expected)


def test_the_editor_gives_the_adapter_its_tokenizers_chat_markers():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    LEMoEEditor(model, tokenizer, calibration=CALIBRATION, **SETTINGS).ensure_calibrated()
    config = model.peft_config["default"]
    assert (config.route_chat_opening, config.route_chat_reply) == chat_markers(tokenizer) != ([], [])


@pytest.mark.parametrize("chat_form", [True, False])
def test_edits_trained_in_the_chat_form_answer_questions_asked_through_the_chat_template(chat_form):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model = new_model()
    editor = LEMoEEditor(model, tokenizer, calibration=CALIBRATION, chat_form=chat_form, **SETTINGS)
    editor.edit(REQUESTS, progress=False)
    asked = evaluate_edits(model, tokenizer, REQUESTS, chat=True)
    assert asked["protocol"]["prompts"] == "through the chat template"
    written = evaluate_edits(model, tokenizer, REQUESTS)
    assert written["rewrite_acc"] == written["rewrite_gen_acc"] == 1.0
    if chat_form:
        assert asked["rewrite_acc"] == asked["rewrite_gen_acc"] == 1.0
    else:
        assert asked["rewrite_gen_acc"] < 0.5, "trained as written only, the tiny model does not answer in chat"


def test_undo_removes_one_batch_and_keeps_the_others():
    model = new_model()
    edit(model, progress=False)
    log = model.peft_config["default"].edit_log
    undone = {r["prompt"] for r in log[1]["requests"]}
    model.base_model.remove_expert(1)
    assert [b["expert"] for b in model.peft_config["default"].edit_log] == [0, 1]
    kept = [r for r in REQUESTS if r.prompt not in undone]
    gone = [r for r in REQUESTS if r.prompt in undone]
    assert evaluate_edits(model, tiny_tokenizer(), kept)["rewrite_acc"] == 1.0
    with model.disable_adapter():
        base = evaluate_edits(model, tiny_tokenizer(), gone)["rewrite_acc"]
    assert evaluate_edits(model, tiny_tokenizer(), gone)["rewrite_acc"] == base


def test_a_crash_mid_stream_resumes_without_redoing_or_losing_batches(tmp_path, monkeypatch):
    straight = new_model()
    edit(straight, progress=False)

    crashed = new_model()
    original = LEMoEEditor.edit_batch
    calls = {"n": 0}

    def crash_on_third(self, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, requests)

    monkeypatch.setattr(LEMoEEditor, "edit_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        edit(crashed, checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    monkeypatch.setattr(LEMoEEditor, "edit_batch", original)
    saved = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())["edit_log"]
    assert len(saved) == 2, "both finished batches were saved"

    resumed = new_model()  # the same script run again: a fresh model, the same command
    report = edit(resumed, checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    assert report.skipped == 6 and report.num_edits == 2
    assert resumed.peft_config["default"].num_experts == 3
    straight.save_pretrained(tmp_path / "straight")
    assert_same_tensors(tmp_path / "straight", tmp_path / "ckpt")


def assert_same_tensors(left, right):
    a, b = load_file(left / "adapter_model.safetensors"), load_file(right / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = new_model()
    edit(model, REQUESTS[:3], checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    before = (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes()

    def broken_save(self, directory, **kwargs):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "adapter_model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", broken_save)
    with pytest.raises(OSError):
        edit(model, REQUESTS[3:6], checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes() == before
    monkeypatch.undo()
    assert PeftModel.from_pretrained(tiny_model(), tmp_path / "ckpt").peft_config["default"].num_experts == 1


def test_a_checkpoint_folder_with_another_history_is_never_overwritten(tmp_path):
    edit(new_model(), REQUESTS[:3], checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    before = (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes()
    other = new_model()
    edit(other, REQUESTS[3:6], progress=False)
    with pytest.raises(ValueError, match="different edit history"):
        edit(other, REQUESTS[6:], checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").read_bytes() == before


def test_a_stream_without_task_type_resumes(tmp_path):
    model = get_peft_model(tiny_model(), LEMoEConfig())
    edit(model, REQUESTS[:3], checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    resumed = get_peft_model(tiny_model(), LEMoEConfig())
    report = edit(resumed, REQUESTS[:6], checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    config = resumed.peft_config["default"]
    assert report.skipped == 3 and config.num_experts == 1 + len(report.batches)
    assert sum(len(record["requests"]) for record in config.edit_log) == 6


def test_editing_continues_after_from_pretrained(tmp_path):
    model = new_model()
    edit(model, REQUESTS[:5], progress=False)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    report = edit(reloaded, progress=False)
    assert report.skipped == 5 and report.num_edits == 3
    config = reloaded.peft_config["default"]
    experts = [b["expert"] for b in config.edit_log]
    assert experts == list(range(config.num_experts)) and len(experts) > 2, "new experts continue the numbering"
    assert evaluate_edits(reloaded, tiny_tokenizer(), REQUESTS)["rewrite_acc"] == 1.0


def test_several_lemoe_layers_edit_together():
    model = get_peft_model(
        tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", target_modules=["down_proj"], layers_to_transform=[1, 3])
    )
    edit(model, REQUESTS[:3], progress=False)
    layers = model.base_model.lemoe_layers()
    assert len(layers) == 2 and all(
        layer.num_anchors("default") == model.peft_config["default"].num_anchors for layer in layers.values()
    )
    assert evaluate_edits(model, tiny_tokenizer(), REQUESTS[:3])["rewrite_acc"] == 1.0


def test_bad_settings_and_models_are_refused():
    with pytest.raises(ValueError, match="batch_size"):
        EditorSettings(batch_size=0)
    with pytest.raises(ValueError, match="train_dtype must be one of"):
        EditorSettings(train_dtype="int8")
    with pytest.raises(ValueError, match="subject_lead must hold exactly one"):
        EditorSettings(subject_lead="tell me about it")
    with pytest.raises(ValueError, match="anchor_threshold must lie in"):
        LEMoEEditor(new_model(), tiny_tokenizer(), anchor_threshold=2.0)
    dot = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_similarity="dot"))
    assert LEMoEEditor(dot, tiny_tokenizer(), anchor_threshold=2.0).settings.anchor_threshold == 2.0
    with pytest.raises(ValueError, match="at least one generic sentence"):
        LEMoEEditor(new_model(), tiny_tokenizer(), calibration=[])
    model = new_model()
    model.add_adapter("other", LEMoEConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="not active.*set_adapter\\('other'\\)"):
        LEMoEEditor(model, tiny_tokenizer(), adapter_name="other")
    with pytest.raises(TypeError, match="LEMoE adapter"):
        LEMoEEditor(tiny_model(), tiny_tokenizer())
    with pytest.raises(ValueError, match="checkpoint_every"):
        edit(new_model(), checkpoint_every=0)


def test_mixed_precision_training_edits_and_keeps_routing_and_experts_float32():
    model = new_model()
    report = LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION, **SETTINGS, train_dtype="bfloat16").edit(
        REQUESTS[:3], progress=False
    )
    (layer,) = model.base_model.lemoe_layers().values()
    assert layer.lemoe_keys["default"].dtype == layer.lemoe_A["default"].dtype == torch.float32
    assert report.batches[0]["settings"]["train_dtype"] == "bfloat16"
    assert evaluate_edits(model, tiny_tokenizer(), REQUESTS[:3], generation=False)["rewrite_acc"] == 1.0


def test_negative_prompts_join_the_batch_and_the_expert_trains_with_them():
    requests = [EditRequest("paris is in", "italy", subject="paris"), EditRequest("who wrote hamlet", "goethe",
                subject="hamlet")]  # fmt: skip
    settings = {**SETTINGS, "negatives_per_edit": 2, "anchor_threshold": -1.0}  # anchors that reach every prompt

    def new_editor():
        model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_subject_threshold=None))
        return LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION, **settings)

    editor = new_editor()
    editor.open_expert(requests)
    batch = editor._opened().batch
    assert batch.input_ids.shape[0] == 4, "one negative per request, the one the anchors reach most"
    assert not batch.predicts[2:].any() and (batch.attention_mask[2:].sum(dim=1) >= 3).all()
    editor = new_editor()
    editor.edit_batch(requests)
    assert evaluate_edits(editor.model, tiny_tokenizer(), requests)["rewrite_acc"] == 1.0


def test_a_subject_lead_gives_each_subject_a_second_key_that_reads_as_the_first():
    requests = [EditRequest("the capital of france is", "rome", subject="france"),
                EditRequest("who wrote hamlet", "goethe", subject="hamlet")]  # fmt: skip
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_subject_names="also"))
    editor = LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION, **SETTINGS, subject_lead="what is {}")
    editor.edit_batch(requests)
    ((name, layer),) = model.base_model.lemoe_layers().items()
    assert layer.lemoe_subject_alias["default"].tolist() == [0, 1, 0, 1]
    assert model.peft_config["default"].num_subjects == 4
    after_lead = editor._last_token_inputs(["what is france", "what is hamlet"])[name]
    assert torch.allclose(layer.lemoe_subjects["default"][2:], layer.subject_queries("default", after_lead))
    assert not torch.allclose(layer.lemoe_subjects["default"][:2], layer.lemoe_subjects["default"][2:], atol=1e-3)
    assert evaluate_edits(model, tiny_tokenizer(), requests, generation=False)["rewrite_acc"] == 1.0


def test_each_subject_key_keeps_its_subjects_name_and_names_alone_route_edits():
    requests = [EditRequest("the nile flows through", "brazil", subject="the nile"),
                EditRequest("who wrote hamlet", "goethe", subject="hamlet")]  # fmt: skip
    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_subject_names="only"))
    LEMoEEditor(model, tokenizer, calibration=CALIBRATION, **SETTINGS, subject_lead="what is {}").edit_batch(requests)
    (layer,) = model.base_model.lemoe_layers().values()
    names = layer.lemoe_subject_names["default"]
    nile, hamlet = tokenizer("the nile").input_ids, tokenizer("hamlet").input_ids
    assert [row[row >= 0].tolist() for row in names] == [nile, hamlet], "as the prompts write them; no lead keys"
    results = evaluate_edits(model, tokenizer, requests)
    assert results["rewrite_acc"] == 1.0 and results["rewrite_gen_acc"] == 1.0


def test_with_subject_tokens_left_out_the_anchors_are_the_queries_without_the_subjects_and_edits_answer():
    requests = [EditRequest("the nile flows through", "brazil", subject="the nile"),
                EditRequest("who wrote hamlet", "goethe", subject="hamlet")]  # fmt: skip
    tokenizer = tiny_tokenizer()
    config = LEMoEConfig(task_type="CAUSAL_LM", route_subject_tokens="left_out")
    model = get_peft_model(tiny_model(), config)
    editor = LEMoEEditor(model, tokenizer, calibration=CALIBRATION, **SETTINGS)
    expert = editor.open_expert(requests)
    ((name, layer),) = model.base_model.lemoe_layers().items()
    batch, captured = editor._opened().batch, editor._opened().captured
    queries = layer.route_queries("default", layer.pooled_queries("default", *captured[name]))
    assert torch.equal(
        layer.lemoe_keys["default"][layer.lemoe_key_expert["default"] == expert], queries[batch.predicts]
    )
    settings = layer.lemoe_settings["default"]
    layer.lemoe_settings["default"] = dataclasses.replace(settings, subject_tokens="pooled")
    pooled = layer.route_queries("default", layer.pooled_queries("default", *captured[name]))
    assert not torch.allclose(pooled[batch.predicts], queries[batch.predicts], atol=1e-3), "the subjects left out"
    layer.lemoe_settings["default"] = settings
    editor.close_expert()
    model = get_peft_model(tiny_model(), config)
    LEMoEEditor(model, tokenizer, calibration=CALIBRATION, **SETTINGS).edit_batch(requests)
    results = evaluate_edits(model, tokenizer, requests)
    assert results["rewrite_acc"] == 1.0 and results["rewrite_gen_acc"] == 1.0


def test_answer_continuations_follow_each_answer_and_are_kept_where_the_expert_reaches_them():
    requests = [EditRequest("paris is in", "italy"), EditRequest("who wrote hamlet", "goethe")]
    tokenizer = tiny_tokenizer()
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    settings = {**SETTINGS, "answer_continuation": 2, "anchor_threshold": -1.0}  # anchors that reach every position
    editor = LEMoEEditor(model, tokenizer, calibration=CALIBRATION, **settings)
    expert = editor.open_expert(requests)
    opened = editor._opened()
    plain = encode(tokenizer, [(r.prompt, r.target_new) for r in requests])
    boundary = word_boundary_tokens(tokenizer, model.get_output_embeddings().weight.shape[0])
    for row, (extended, original) in enumerate(zip(opened.batch.token_lists(), plain.token_lists(), strict=True)):
        assert extended[: len(original)] == original and len(extended) == len(original) + 2
        assert boundary[extended[len(original)]], "the first token after the answer ends it"
        assert torch.equal(opened.batch.predicts[row, : len(original)], plain.predicts[row, : len(original)])
        assert not opened.batch.predicts[row, len(original) :].any()
    preserved = editor._preserved_positions(expert, opened.batch, opened.captured)
    tails = opened.batch.attention_mask.bool() & ~answer_ends(opened.batch.predicts).cumsum(dim=1).eq(0)
    assert preserved[tails & ~answer_ends(opened.batch.predicts)].all()
    editor.close_expert()
    plain_editor = LEMoEEditor(new_model(), tokenizer, calibration=CALIBRATION, **SETTINGS)
    plain_editor.open_expert(requests)
    assert plain_editor._opened().batch.token_lists() == plain.token_lists(), "off by default"
