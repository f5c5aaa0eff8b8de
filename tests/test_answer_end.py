"""Ending each answer at a word boundary: which tokens end a word, where answers end, and the training term that
makes the token after an answer one of them."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lemoe_peft.teacher_forcing import answer_ends, encode, position_logits, word_boundary_tokens
from lemoe_peft.training import Objective, fit

from .helpers import FACTS, tiny_model, tiny_tokenizer

WORD_PIECES = ["a", "paris", "ian", "titan", ",", "?", "1940", "s"]


def _tokenizer(marker: str) -> PreTrainedTokenizerFast:
    """A word-piece vocabulary where a leading ``marker`` means "starts a new word" (byte-level BPE's "Ġ" or
    SentencePiece's "▁"), with the matching decoder."""
    vocab = {"<eos>": 0, **{piece: i + 1 for i, piece in enumerate(WORD_PIECES)}}
    vocab |= {marker + piece: len(vocab) + i for i, piece in enumerate(WORD_PIECES)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.ByteLevel() if marker == "Ġ" else decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.mark.parametrize("marker", ["Ġ", "▁"], ids=["byte-level-bpe", "sentencepiece"])
def test_tokens_that_start_a_word_or_punctuation_end_the_word_before_them(marker):
    tokenizer = _tokenizer(marker)
    boundary = word_boundary_tokens(tokenizer, vocab_size=len(tokenizer) + 3)  # models may pad their vocabulary
    ends = {tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer)) if boundary[i]}
    continuing = set(WORD_PIECES) - {",", "?"}
    assert ends == {"<eos>", ",", "?", *(marker + piece for piece in WORD_PIECES)} - continuing
    assert not boundary[len(tokenizer) :].any(), "padding ids the tokenizer never produces end nothing"


def test_the_position_of_each_answers_last_token_predicts_what_follows_it():
    batch = encode(tiny_tokenizer(), [("paris is in", "italy"), ("rome is the capital of", "spain")])
    ends = answer_ends(batch.predicts)
    lengths = batch.attention_mask.sum(dim=1)
    assert ends.sum(dim=1).tolist() == [1, 1]
    assert ends.nonzero()[:, 1].tolist() == (lengths - 1).tolist(), "the last real token of each row"
    assert not (ends & batch.predicts).any()


def _trained(answer_end: torch.Tensor | None, rows_per_pass: int = 32, steps: int = 30):
    """The tiny model's output layer trained on two facts; the ends' probability of ``answer_end`` tokens after."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    batch = encode(tokenizer, [(prompt, target) for prompt, target, _ in FACTS[:2]])
    weight = model.get_output_embeddings().weight
    result = fit(
        model, [weight], Objective(batch, answer_end=answer_end), max_steps=steps, learning_rate=0.05,
        early_stop_loss=0.0, rows_per_pass=rows_per_pass,
    )  # fmt: skip
    with torch.no_grad():
        probs = position_logits(model, batch, answer_ends(batch.predicts)).softmax(-1)
    return result, weight.detach().clone(), probs


def test_training_with_answer_ends_makes_the_next_token_end_the_answer():
    only_eos = torch.zeros(tiny_model().config.vocab_size, dtype=torch.bool)
    only_eos[tiny_tokenizer().eos_token_id] = True
    (_, plain_loss), _, plain = _trained(None)
    (_, loss), _, ended = _trained(only_eos)
    assert plain[:, only_eos].sum(-1).max() < 0.1, "without the term nothing makes EOS follow the answers"
    assert ended[:, only_eos].sum(-1).min() > 0.9
    assert loss > plain_loss, "the answer loss counts each answer's end as one more answer token"


def test_answer_ends_train_the_same_in_parts():
    only_eos = torch.zeros(tiny_model().config.vocab_size, dtype=torch.bool)
    only_eos[tiny_tokenizer().eos_token_id] = True
    (steps, loss), weight, _ = _trained(only_eos, rows_per_pass=32, steps=5)
    (steps_in_parts, loss_in_parts), weight_in_parts, _ = _trained(only_eos, rows_per_pass=1, steps=5)
    assert steps == steps_in_parts == 5 and abs(loss - loss_in_parts) < 1e-5
    assert torch.allclose(weight, weight_in_parts, atol=1e-5)
