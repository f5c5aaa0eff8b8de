"""The metrics are EasyEdit's: teacher-forced token accuracy of the answer, and agreement with the unedited model on
locality probes. Checked against a model whose predictions are known in advance (it cannot generate: the
generation-based metrics are checked in test_generation.py)."""

from types import SimpleNamespace

import pytest
import torch

from lemoe_peft import EditRequest, Probe, evaluate_edits, locality_reference
from lemoe_peft.teacher_forcing import encode

from .helpers import tiny_tokenizer


class NextId(torch.nn.Module):
    """Predicts token id + ``step`` after every token."""

    def __init__(self, step: int = 1):
        super().__init__()
        self.step = step
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep=None):
        logits = torch.nn.functional.one_hot((input_ids + self.step) % 128, 128).float()
        return SimpleNamespace(logits=logits[logits_to_keep] if logits_to_keep is not None else logits)


TOKENIZER = tiny_tokenizer()
# ids: paris 3, rome 4, berlin 5, madrid 6, london 7
REQUESTS = [
    EditRequest(
        "paris",
        "rome berlin",  # predicted 4, 5: both right
        rephrase_prompts=("madrid", "berlin"),  # rome after madrid/berlin is wrong; berlin after rome is right: 0.5
        locality=(Probe("rome", "berlin madrid"),),
        portability=(Probe("berlin", "madrid paris"),),  # 6 right, then 7 vs 3 wrong -> 0.5
    ),
    EditRequest("paris", "rome madrid"),  # 4 right, 5 vs 6 wrong -> 0.5
]


def test_answer_tokens_are_the_tokens_after_the_prompt():
    batch = encode(TOKENIZER, [("paris", "rome berlin"), ("paris is in", "rome")])
    assert batch.answers.tolist() == [4, 5, 4] and batch.answer_lengths == [2, 1]
    assert batch.predicts[0].tolist() == [True, True, False, False]  # positions that predict rome, berlin
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 0]


def test_metrics_follow_their_definitions():
    reference = locality_reference(NextId(step=1), TOKENIZER, REQUESTS)
    results = evaluate_edits(
        NextId(step=1), TOKENIZER, REQUESTS, reference=reference, protocol={"seed": 3}, generation=False
    )
    assert [case["rewrite_acc"] for case in results["cases"]] == [1.0, 0.5]
    assert results["rewrite_acc"] == 0.75
    assert results["rephrase_acc"] == 0.5 and results["portability_acc"] == 0.5
    assert results["locality_acc"] == 1.0, "same predictions as the reference model"
    assert "rephrase_acc" not in results["cases"][1], "a case without rephrases has no generality score"
    assert results["protocol"]["T"] == 2 and results["protocol"]["seed"] == 3
    assert results["protocol"]["evaluated"] == "after_stream"


def test_locality_counts_agreement_with_the_unedited_model_not_the_answer():
    reference = locality_reference(NextId(step=2), TOKENIZER, REQUESTS)
    results = evaluate_edits(NextId(step=1), TOKENIZER, REQUESTS, reference=reference, generation=False)
    assert results["locality_acc"] == 0.0


def test_locality_needs_a_reference_for_models_without_adapters():
    with pytest.raises(ValueError, match="locality_reference"):
        evaluate_edits(NextId(), TOKENIZER, REQUESTS, generation=False)
