"""Generation-based metrics: greedy cached generate() as users run it. Checked with a tiny Llama whose greedy next
token is scripted, and batched (left-padded) generation against one prompt at a time, with and without LEMoE."""

import dataclasses
import logging

import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lemoe_peft import EditRequest, GenerationSettings, LEMoEConfig, Probe, evaluate_edits
from lemoe_peft.evaluation import restates_edit
from lemoe_peft.generation import answers_with, greedy_continuations, greedy_token_continuations

from .helpers import TINY_CONFIGS, VOCAB, give_expert, tiny_model, tiny_tokenizer

TOKENIZER = tiny_tokenizer()
TOKENIZER.add_tokens(["\n"])
NEWLINE, EOS = TOKENIZER.convert_tokens_to_ids("\n"), TOKENIZER.eos_token_id


def ids(text: str) -> list[int]:
    return TOKENIZER(text).input_ids


class ScriptedLM(LlamaForCausalLM):
    """A tiny Llama whose greedy next token after token t is ``script[t]`` (EOS for unscripted tokens)."""

    def __init__(self, script: dict[str, str]):
        torch.manual_seed(0)
        super().__init__(LlamaConfig(**TINY_CONFIGS["llama"]))
        self.script = torch.full((VOCAB,), EOS)
        for word, following in script.items():
            self.script[TOKENIZER.convert_tokens_to_ids(word)] = TOKENIZER.convert_tokens_to_ids(following)
        self.eval()

    def forward(self, input_ids=None, **kwargs):
        output = super().forward(input_ids=input_ids, **kwargs)
        last = input_ids[:, -output.logits.shape[1] :]
        output.logits = output.logits + 1000 * torch.nn.functional.one_hot(self.script[last], VOCAB)
        return output


SCRIPT = {"in": "rome", "rome": "\n", "\n": "rome", "hamlet": "shakespeare", "of": "rome", "sky": "blue"}
SCRIPT |= {"blue": "green", "green": "red", "through": "egypt", "egypt": "italy", "italy": "brazil", "brazil": "spain"}


@pytest.mark.parametrize(
    ("continuation", "target", "expected"),
    [
        (" rome", "rome", True),
        ("  new  york\tcity", "new york", True),  # whitespace is normalized; continues past a word boundary
        ("Paris, France", "Paris", True),
        ("Parisian", "Paris", False),  # a longer word is not the target
        ("the city of Paris", "Paris", False),  # the continuation must start with the target
        ("Par", "Paris", False),
    ],
)
def test_a_continuation_answers_when_it_starts_with_the_target_at_a_word_boundary(continuation, target, expected):
    assert answers_with(continuation, target) is expected


def test_generation_stops_at_eos_newline_or_the_token_budget():
    model = ScriptedLM(SCRIPT)
    prompts = ["paris is in", "who wrote hamlet", "the nile flows through"]
    assert greedy_continuations(model, TOKENIZER, prompts, [5, 5, 5], stop_at_newline=True) == [
        ids("rome") + [NEWLINE],  # stops after the newline
        ids("shakespeare") + [EOS],  # stops at EOS
        ids("egypt italy brazil spain") + [EOS],
    ]
    assert greedy_continuations(model, TOKENIZER, prompts[:1], [3])[0] == [*ids("rome"), NEWLINE, *ids("rome")]
    assert greedy_continuations(model, TOKENIZER, prompts[2:], [2])[0] == ids("egypt italy"), "the token budget"


def test_token_rows_continue_from_a_restricted_first_token():
    model = ScriptedLM(SCRIPT)
    rows = [ids("paris is in"), ids("the nile flows through")]
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[ids("blue")] = True  # not what the script writes first ("rome", "egypt")
    restricted = greedy_token_continuations(model, TOKENIZER, rows, [3, 3], first_tokens=allowed)
    assert restricted == [ids("blue green red")] * 2, "the allowed first token, then the script"
    assert greedy_token_continuations(model, TOKENIZER, rows, [3, 3]) == greedy_continuations(
        model, TOKENIZER, ["paris is in", "the nile flows through"], [3, 3]
    )


def test_generation_metrics_follow_their_definitions():
    requests = [
        EditRequest(
            "paris is in",
            "rome",  # "rome\n": right
            rephrase_prompts=("the capital of", "who wrote hamlet"),  # "rome": right; "shakespeare": wrong
            locality=(Probe("the sky", "blue"), Probe("who wrote hamlet", "shakespeare")),
            portability=(Probe("the nile flows through", "egypt"),),  # "egypt italy brazil": right
        ),
        EditRequest("who wrote hamlet", "goethe", portability=(Probe("the nile flows through", "egypt italy spain"),)),
        # ^ "shakespeare": wrong; "egypt italy brazil spain": wrong on its third word
        EditRequest("the nile flows through", "egypt italy brazil spain norway"),  # budget 8 tokens, EOS after 4
    ]
    unedited = ScriptedLM({**SCRIPT, "blue": "red"})  # differs from the edited model after "the sky blue"
    settings = GenerationSettings(locality_tokens=1)
    one_token = greedy_continuations(unedited, TOKENIZER, ["the sky", "who wrote hamlet"], [1, 1])
    results = evaluate_edits(
        ScriptedLM(SCRIPT),
        TOKENIZER,
        requests,
        generation_reference=one_token,
        reference=[torch.tensor([0]), torch.tensor([0])],
        generation=settings,
    )
    cases = results["cases"]
    assert [c["rewrite_gen_acc"] for c in cases] == [1.0, 0.0, 0.0]
    assert cases[0]["rephrase_gen_acc"] == 0.5 and "rephrase_gen_acc" not in cases[1]
    assert [c.get("portability_gen_acc") for c in cases] == [1.0, 0.0, None]
    assert cases[0]["locality_gen_acc"] == 1.0, "the first token agrees with the unedited model's"
    assert results["rewrite_gen_acc"] == pytest.approx(1 / 3) and results["portability_gen_acc"] == 0.5
    assert results["protocol"]["generation"]["locality_tokens"] == 1

    eight_tokens = greedy_continuations(unedited, TOKENIZER, ["the sky", "who wrote hamlet"], [8, 8])
    results = evaluate_edits(
        ScriptedLM(SCRIPT),
        TOKENIZER,
        requests,
        generation_reference=eight_tokens,
        reference=[torch.tensor([0]), torch.tensor([0])],
    )
    assert results["cases"][0]["locality_gen_acc"] == 0.5, "'the sky' continues 'blue green' vs 'blue red'"


def test_other_locality_leaves_out_the_probes_that_restate_the_edited_fact():
    request = EditRequest(
        "who wrote hamlet",
        "marlowe",
        ground_truth="shakespeare",
        subject="hamlet",
        locality=(Probe("the sky", "blue"), Probe("hamlet", "shakespeare")),  # the second restates the edit
    )
    unedited = ScriptedLM({**SCRIPT, "blue": "red"})  # "the sky" continues "blue red" there, "blue green" here
    results = evaluate_edits(
        ScriptedLM(SCRIPT),
        TOKENIZER,
        [request],
        reference=[torch.tensor(ids("blue")), torch.tensor([0])],  # teacher-forced: the first agrees, the second not
        generation_reference=greedy_continuations(unedited, TOKENIZER, ["the sky", "hamlet"], [2, 2]),
        generation=GenerationSettings(locality_tokens=2),
    )
    assert (results["locality_acc"], results["locality_other_acc"]) == (0.5, 1.0)
    assert (results["locality_gen_acc"], results["locality_other_gen_acc"]) == (0.5, 0.0)


def test_a_neighbour_with_the_same_answer_but_another_subject_does_not_restate_the_edit():
    request = EditRequest("Danielle Darrieux speaks", "English", ground_truth="French", subject="Danielle Darrieux")
    assert restates_edit(request, Probe("The mother tongue of danielle darrieux is", "french"))
    assert not restates_edit(request, Probe("The mother tongue of Léon Blum is", "French"))  # CounterFact neighbour
    assert not restates_edit(request, Probe("Danielle Darrieux was born in", "Paris"))
    assert not restates_edit(dataclasses.replace(request, subject=None), Probe("Danielle Darrieux speaks", "French"))


def test_other_locality_leaves_out_probes_that_ask_a_fact_edited_elsewhere_in_the_stream():
    """A neighbour of one edit can be the subject of another edit of the same relation: its answer should change."""
    first = EditRequest(
        "who wrote hamlet", "marlowe", ground_truth="shakespeare", subject="hamlet",
        locality=(Probe("the sky", "blue"), Probe("who wrote othello", "shakespeare")),
    )  # fmt: skip
    second = EditRequest("who wrote othello", "bacon", ground_truth="shakespeare", subject="othello")
    model, reference = ScriptedLM(SCRIPT), [torch.tensor(ids("blue")), torch.tensor([0])]
    alone = evaluate_edits(model, TOKENIZER, [first], reference=reference, generation=False)
    assert alone["locality_other_acc"] == alone["locality_acc"] == 0.5
    both = evaluate_edits(model, TOKENIZER, [first], reference=reference, generation=False, edits=[first, second])
    assert (both["locality_acc"], both["locality_other_acc"]) == (0.5, 1.0)


def test_generation_metrics_can_be_skipped():
    request = EditRequest("paris is in", "rome", locality=(Probe("the sky", "blue"),))
    results = evaluate_edits(ScriptedLM(SCRIPT), TOKENIZER, [request], reference=[torch.tensor([0])], generation=False)
    assert "rewrite_acc" in results and not any(key.endswith("_gen_acc") for key in results)
    assert results["protocol"]["generation"] is None
    with pytest.raises(ValueError, match="locality_generation_reference"):
        evaluate_edits(ScriptedLM(SCRIPT), TOKENIZER, [request], reference=[torch.tensor([0])])


PROMPTS = [
    "paris is in",
    "who wrote hamlet",
    "the nile flows through the country of",
    "sky",
    "what colour is the grass",
    "mona lisa painted by leonardo is in",
]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_batched_left_padded_generation_gives_the_tokens_of_one_prompt_at_a_time(model_type):
    model = tiny_model(model_type)
    budgets = [8, 3, 8, 6, 8, 5]

    def one_at_a_time(m):
        return [greedy_continuations(m, TOKENIZER, [p], [b])[0] for p, b in zip(PROMPTS, budgets, strict=True)]

    plain = one_at_a_time(model)
    assert greedy_continuations(model, TOKENIZER, PROMPTS, budgets, batch_size=4) == plain
    assert [len(tokens) for tokens in plain] == budgets

    edited = get_peft_model(model, LEMoEConfig(task_type="CAUSAL_LM"))
    # the shortest prompt (left-padded in its batch), anchored with its unedited continuation
    give_expert(edited, torch.tensor([ids("sky") + plain[3]]), scale=2.0)
    alone = one_at_a_time(edited)
    assert alone[3] != plain[3], "the expert changes what the anchored prompt generates"
    assert greedy_continuations(edited, TOKENIZER, PROMPTS, budgets, batch_size=16) == alone


def test_generating_with_adapters_disabled_or_without_anchors_does_not_warn_about_the_kv_cache(caplog):
    edited = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    with caplog.at_level(logging.WARNING, logger="lemoe_peft.routing"):
        greedy_continuations(edited, TOKENIZER, ["paris is in"], [3])  # no anchors yet: no layer routes
        give_expert(edited, torch.tensor([ids("sky")]))
        with edited.disable_adapter():
            greedy_continuations(edited, TOKENIZER, ["paris is in"], [3])
    assert "did not fill" not in caplog.text
