"""KV anchor routing: its pieces, and the consistency the method is named for (teacher-forced vs cached generation)."""

import dataclasses

import pytest
import torch
from peft import get_peft_model
from transformers import DynamicCache

from lemoe_peft import LEMoEConfig, chat_markers, token_marks
from lemoe_peft.routing import (
    SENTENCE_END,
    SPACE_BEFORE,
    causal_mean,
    chat_turn_table,
    chat_turns,
    experts_from_scores,
    hold_queries,
    left_out_subjects,
    named_subjects,
    route_projection,
    select_experts,
    sentence_starts,
    subject_presence,
    token_counts,
    whiten,
    whitening_statistics,
)

from .helpers import CHAT_TEMPLATE, give_expert, sentence_marks, tiny_model, tiny_tokenizer, token_batch


def test_causal_mean_continues_from_a_prefix_exactly():
    x = torch.randn(2, 7, 5)
    whole, _ = causal_mean(x)
    first, sums = causal_mean(x[:, :4])
    rest, _ = causal_mean(x[:, 4:], prefix=sums)
    assert torch.allclose(whole, torch.cat([first, rest], dim=1), atol=1e-6)
    assert torch.allclose(whole[:, 2], x[:, :3].mean(dim=1), atol=1e-6)


def test_causal_mean_ignores_padding():
    x = torch.randn(1, 5, 3)
    valid = torch.tensor([[False, False, True, True, True]])
    means, _ = causal_mean(x, valid)
    assert torch.allclose(means[0, 3], x[0, 2:4].mean(dim=0), atol=1e-6)


def test_causal_mean_restarts_where_a_sentence_begins_in_one_pass_and_across_calls():
    x = torch.randn(2, 8, 5, dtype=torch.float64)
    starts = torch.zeros(2, 8, dtype=torch.bool)
    starts[0, 3] = starts[0, 6] = True
    whole, _ = causal_mean(x, starts=starts)
    assert torch.allclose(whole[0, 2], x[0, :3].mean(dim=0).float(), atol=1e-6), "before the first start: all"
    assert torch.allclose(whole[0, 5], x[0, 3:6].mean(dim=0).float(), atol=1e-6)
    assert torch.allclose(whole[0, 7], x[0, 6:].mean(dim=0).float(), atol=1e-6)
    assert torch.allclose(whole[1], causal_mean(x[1:])[0][0]), "a row without starts is the plain running mean"
    for split in (2, 4, 7):  # a start after, before and inside the split
        first, sums = causal_mean(x[:, :split], starts=starts[:, :split])
        rest, _ = causal_mean(x[:, split:], prefix=sums, starts=starts[:, split:])
        assert torch.allclose(whole, torch.cat([first, rest], dim=1), atol=1e-12)


def _mean_without_names(x, ids, names, starts, recent=None):
    """causal_mean with subject names left out (one call, continuing ``recent``: ids, sums and inputs carried)."""
    recent_ids, sums, inputs = recent or (None, None, None)
    named, recent_ids = named_subjects(ids.contiguous(), names, None, recent_ids)
    removed, inputs = left_out_subjects(x, None, named, (names >= 0).sum(dim=1), starts, inputs)
    means, sums = causal_mean(x, None, sums, starts, removed)
    return means, (recent_ids, sums, inputs)


def test_subject_names_leave_the_mean_from_their_last_token_in_one_pass_and_across_calls():
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    ids = torch.tensor([[5, 6, 7, 8, 9, 7, 8, 3, 7], [7, 8, 7, 8, 2, 2, 6, 7, 8]])
    names = torch.tensor([[-1, 7, 8], [-1, -1, 2]])  # the two-token name "7 8" and the one-token name "2"
    starts = torch.zeros(2, 9, dtype=torch.bool)
    starts[1, 3] = True  # a sentence begins inside a name
    whole, _ = _mean_without_names(x, ids, names, starts)

    def mean(row, tokens):
        return x[row, tokens].mean(dim=0).float()

    assert torch.allclose(whole[0, 2], mean(0, [0, 1, 2])), "a name counts until it is complete"
    assert torch.allclose(whole[0, 3], mean(0, [0, 1])) and torch.allclose(whole[0, 7], mean(0, [0, 1, 4, 7]))
    assert torch.allclose(whole[0, 8], mean(0, [0, 1, 4, 7, 8])), "an incomplete name still counts"
    assert (whole[1, 3] == 0).all() and (whole[1, 5] == 0).all(), "nothing left: the start dropped token 2"
    assert torch.allclose(whole[1, 7], mean(1, [6, 7])) and torch.allclose(whole[1, 8], mean(1, [6]))
    for split in range(1, 9):  # every split, names and the start on both sides of it
        first, recent = _mean_without_names(x[:, :split], ids[:, :split], names, starts[:, :split])
        rest, _ = _mean_without_names(x[:, split:], ids[:, split:], names, starts[:, split:], recent)
        assert torch.allclose(whole, torch.cat([first, rest], dim=1), atol=1e-12), split


def test_a_sentence_begins_after_a_sentence_end_and_whitespace():
    tokenizer = tiny_tokenizer()
    marks = token_marks(tokenizer)
    assert marks.shape == (len(tokenizer),)
    vocab = tokenizer.get_vocab()
    assert marks[vocab["."]] == marks[vocab["!"]] == SENTENCE_END | SPACE_BEFORE
    assert marks[vocab["paris"]] == SPACE_BEFORE and marks[vocab["[PAD]"]] == 0
    ids = torch.tensor(tokenizer(["paris is in france . who wrote hamlet ! the"] * 2).input_ids)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, 4] = False  # the first "." as padding
    starts, last = sentence_starts(ids, marks, valid)
    assert starts[0].nonzero()[:, 0].tolist() == [5, 9] and starts[1].nonzero()[:, 0].tolist() == [9]
    before, previous = sentence_starts(ids[:, :5], marks, valid[:, :5])
    after, _ = sentence_starts(ids[:, 5:], marks, valid[:, 5:], previous)
    assert torch.equal(torch.cat([before, after], dim=1), starts), "a sentence end read in an earlier call counts"
    assert torch.equal(last, marks[ids[:, -1]])
    glued = marks.clone()
    glued[vocab["who"]] = 0  # written without whitespace before it: "france .who" is not a new sentence
    assert not sentence_starts(ids[:1], glued)[0][0, 5]


def test_chat_markers_are_read_from_the_tokenizers_chat_template():
    tokenizer = tiny_tokenizer()
    assert chat_markers(tokenizer) == ([], []), "no chat template, no markers"
    tokenizer.chat_template = CHAT_TEMPLATE
    opening, reply = chat_markers(tokenizer)
    assert tokenizer.convert_ids_to_tokens(opening) == ["tolstoy"]
    assert tokenizer.convert_ids_to_tokens(reply) == ["[EOS]", "leonardo"]
    tokenizer.chat_template = "{{ raise_exception('Only one message, please') }}"
    assert chat_markers(tokenizer) == ([], []), "a template that refuses the probe conversations: no markers"


def test_chat_turns_start_after_a_message_opening_and_hold_the_template_before_the_reply():
    table = chat_turn_table([7, 8], [2, 9, 10])
    assert table.tolist() == [[-1, 7, 8], [-1, -1, 2], [-1, 2, 9], [2, 9, 10]]
    # system text, opening, a message, the reply's template, an answer, and again (padding in row 1)
    ids = torch.tensor([[5, 7, 8, 30, 31, 2, 9, 10, 40, 2, 7, 8, 32], [0, 0, 7, 8, 30, 2, 9, 10, 41, 42, 43, 44, 45]])
    valid = ids != 0
    starts, held, recent = chat_turns(ids, table, valid)
    assert starts[0].nonzero()[:, 0].tolist() == [3, 12] and starts[1].nonzero()[:, 0].tolist() == [4]
    assert held[0].nonzero()[:, 0].tolist() == [5, 6, 7, 9] and held[1].nonzero()[:, 0].tolist() == [5, 6, 7]
    assert recent.tolist() == ids[:, -3:].tolist()
    for split in (2, 3, 6, 12):  # inside the opening, right after it, inside the reply's template, before a start
        first, first_held, recent = chat_turns(ids[:, :split], table, valid[:, :split])
        rest, rest_held, _ = chat_turns(ids[:, split:], table, valid[:, split:], recent)
        assert torch.equal(torch.cat([first, rest], dim=1), starts), split
        assert torch.equal(torch.cat([first_held, rest_held], dim=1), held), split
    assert not chat_turns(ids, chat_turn_table([], []))[0].any(), "no markers: no starts"


def test_held_tokens_take_the_query_of_the_last_token_not_held():
    queries = torch.arange(12.0).view(1, 6, 2)
    held = torch.tensor([[False, True, True, False, True, False]])
    kept, last = hold_queries(queries, held)
    assert kept[0, :, 0].tolist() == [0, 0, 0, 6, 6, 10] and torch.equal(last, queries[:, -1])
    kept, _ = hold_queries(queries[:, 1:], held[:, 1:], previous=queries[:, 0])
    assert kept[0, :, 0].tolist() == [0, 0, 6, 6, 10], "held from the first token: the earlier call's query"


def test_whitening_equalises_principal_directions_and_shrinks_the_rest():
    samples = torch.randn(2000, 8) * torch.tensor([10.0, 5, 1, 1, 1, 1, 1, 1]) + 3
    mean, basis, scale = whitening_statistics(samples, rank=2)
    assert torch.allclose(mean, samples.mean(0), atol=1e-4)
    spread = whiten(samples, mean, route_projection(basis, scale, dim=8), normalize=False).std(0)
    assert torch.allclose(spread[:2], torch.ones(2), atol=0.05)  # variance 100 and 25 -> 1
    assert torch.allclose(spread[2:], spread[2:].mean(), atol=0.05) and spread[2:].mean() < 0.9  # shrunk noise


def test_reduced_routing_space_keeps_principal_coordinates_and_approximates_cosines():
    torch.manual_seed(0)
    samples = torch.randn(3000, 512) * torch.cat([torch.full((16,), 8.0), torch.ones(496)])
    mean, basis, scale = whitening_statistics(samples, rank=16)
    full = whiten(samples[:200], mean, route_projection(basis, scale, dim=512), normalize=True)
    reduced_projection = route_projection(basis, scale, dim=256)
    assert reduced_projection.shape == (512, 256)
    assert torch.equal(reduced_projection, route_projection(basis, scale, dim=256)), "fixed, not redrawn"
    reduced = whiten(samples[:200], mean, reduced_projection, normalize=True)
    principal = whiten(samples[:200], mean, route_projection(basis, scale, dim=16), normalize=False)
    assert torch.allclose(principal, ((samples[:200] - mean) @ basis) * scale[:16], atol=1e-3)
    error = (reduced @ reduced.T - full @ full.T).abs()
    assert error.mean() < 0.05 and error.max() < 0.3


def test_select_experts_thresholds_ties_and_top_k():
    keys = torch.eye(3)
    key_expert = torch.tensor([0, 1, 1])
    threshold = torch.full((3,), 0.5)
    queries = torch.tensor([[1.0, 0, 0], [0, 0.8, 0.6], [0.1, 0.1, 0.1], [0.6, 0.8, 0]])
    experts, weights = select_experts(queries, keys, key_expert, threshold, 2, 1, 0.1)
    assert experts[:, 0].tolist() == [0, 1, -1, 1]  # below every threshold: no expert
    assert weights[2].sum() == 0 and torch.allclose(weights[[0, 1, 3]].sum(-1), torch.ones(3))
    tied, _ = select_experts(
        torch.tensor([[1.0, 0, 0]]), torch.eye(3)[[0, 0]], torch.tensor([0, 1]), threshold[:2], 2, 1, 0.1
    )
    assert tied.item() == 1, "on equal scores the newest expert wins (a re-edit overrides)"
    experts, weights = select_experts(queries[3:], keys, key_expert, threshold, 2, 2, 0.1)
    assert experts.tolist() == [[1, 0]] and torch.allclose(weights.sum(), torch.tensor(1.0))


def _edited_model(pooling: str = "causal_mean"):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_pooling=pooling))
    prompt = token_batch(1, 6, seed=3)
    with torch.no_grad():
        continuation = model.generate(prompt, max_new_tokens=6, do_sample=False)
    give_expert(model, continuation, scale=3.0)  # anchors at every position of prompt + continuation
    return model, prompt


def _generated_forced_and_base(model, prompt):
    """Logits of 6 greedy tokens generated with a KV cache, of the same tokens teacher-forced, and of the base model."""
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        forced = model(out.sequences).logits[0, prompt.shape[1] - 1 : -1]
        with model.disable_adapter():
            base = model(out.sequences).logits[0, prompt.shape[1] - 1 : -1]
    return torch.cat(out.logits), forced, base


@pytest.mark.parametrize("pooling", ["causal_mean", "mean_and_token"])
def test_generation_with_kv_cache_routes_like_teacher_forcing(pooling):
    generated, forced, base = _generated_forced_and_base(*_edited_model(pooling))
    assert not torch.allclose(forced, base, atol=1e-2), "the expert must be active on the generated tokens"
    assert torch.allclose(generated, forced, atol=1e-4)


@pytest.mark.parametrize("pooling", ["causal_mean", "mean_and_token"])
def test_generation_with_kv_cache_routes_like_teacher_forcing_across_sentence_starts(pooling):
    config = LEMoEConfig(task_type="CAUSAL_LM", route_pooling=pooling, route_generated_tokens="any")
    model = get_peft_model(tiny_model(), config)
    marks = sentence_marks()
    model.base_model.set_token_marks(marks)
    prompt = token_batch(1, 6, seed=3)
    with torch.no_grad():
        continuation = model.generate(prompt, max_new_tokens=6, do_sample=False)
    starts, _ = sentence_starts(continuation, marks)
    assert starts[0, 1:6].any() and starts[0, 6:].any(), "sentences begin in the prompt and in the generated tokens"
    give_expert(model, continuation, scale=3.0)
    (layer,) = model.base_model.lemoe_layers().values()
    with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
        model(input_ids=continuation)
    (inputs,) = captured.values()
    restarted, whole = (layer.pooled_queries("default", inputs.x, None, ids) for ids in (continuation, None))
    assert not torch.allclose(restarted, whole), "the query restarted"
    generated, forced, base = _generated_forced_and_base(model, prompt)
    assert not torch.allclose(forced, base, atol=1e-2), "the expert must be active on the generated tokens"
    assert torch.allclose(generated, forced, atol=1e-4)
    with pytest.raises(RuntimeError, match="frozen once anchors exist"):
        model.base_model.set_token_marks(marks)


OPENING, REPLY = [7, 8], [2, 9, 10]


def _chat_ids(message: list[int]) -> torch.Tensor:
    """A system text, then ``message`` asked through the tiny ids' chat markers, and the reply's template."""
    return torch.tensor([[5, 6, 11, 12, *OPENING, *message, *REPLY]])


@pytest.mark.parametrize("pooling", ["causal_mean", "mean_and_token", "token"])
def test_a_message_asked_through_a_chat_template_is_routed_as_the_message_alone(pooling):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_pooling=pooling))
    model.base_model.set_chat_markers(OPENING, REPLY)
    assert model.peft_config["default"].route_chat_reply == REPLY
    (layer,) = model.base_model.lemoe_layers().values()
    message = [30, 31, 32]
    ids = _chat_ids(message)
    x = torch.randn(1, ids.shape[1], layer.in_features)
    begin = 4 + len(OPENING)
    alone = layer.pooled_queries("default", x[:, begin : begin + 3], None, torch.tensor([message]))
    chat = layer.pooled_queries("default", x, None, ids)
    assert torch.allclose(chat[:, begin : begin + 3], alone, atol=1e-6), "the system text does not count"
    assert torch.allclose(chat[0, begin + 3 :], alone[0, -1].expand(len(REPLY), -1), atol=1e-6), "reply: as message"
    assert not torch.allclose(chat, layer.pooled_queries("default", x, None, None)), "without ids: nothing known"


def test_generation_with_kv_cache_routes_like_teacher_forcing_across_chat_turns():
    config = LEMoEConfig(task_type="CAUSAL_LM", route_generated_tokens="any")
    model = get_peft_model(tiny_model(), config)
    model.base_model.set_chat_markers(OPENING, REPLY)
    ids = torch.cat([_chat_ids([30, 31, 32]), torch.tensor([[40, 41, *OPENING, 33, 34, *REPLY, 42]])], dim=1)
    give_expert(model, ids, scale=3.0)
    with torch.no_grad():
        whole = model(ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(ids).logits, whole, atol=1e-2), "the expert must be active"
        for splits in ([5, 9, 11], [6, 10, 16, 19], list(range(1, ids.shape[1]))):
            cache, pieces = DynamicCache(), []
            for begin, end in zip([0, *splits], [*splits, ids.shape[1]], strict=True):
                pieces.append(model(ids[:, begin:end], cache=cache, use_cache=True).logits)
            assert torch.allclose(torch.cat(pieces, dim=1), whole, atol=1e-4), splits
    with pytest.raises(RuntimeError, match="frozen once anchors exist"):
        model.base_model.set_chat_markers(OPENING, REPLY)


def test_route_restart_off_pools_everything_read_whatever_the_marks():
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_restart="off"))
    model.base_model.set_token_marks(sentence_marks())
    (layer,) = model.base_model.lemoe_layers().values()
    x, ids = torch.randn(1, 9, layer.in_features), token_batch(1, 9, seed=3)
    assert torch.equal(layer.pooled_queries("default", x, None, ids), layer.pooled_queries("default", x))


def test_a_generated_token_reaches_only_the_experts_the_prompts_last_token_reached():
    prompt = token_batch(1, 6, seed=3)
    routed = {}
    for rule in ("any", "prompt_experts"):
        config = LEMoEConfig(task_type="CAUSAL_LM", route_pooling="token", route_generated_tokens=rule)
        model = get_peft_model(tiny_model(), config)
        with torch.no_grad():
            continuation = model.generate(prompt, max_new_tokens=6, do_sample=False)
        give_expert(model, continuation, scale=3.0, positions=slice(prompt.shape[1], None))  # generated tokens only
        routed[rule] = _generated_forced_and_base(model, prompt)
    generated, forced, base = routed["any"]
    assert torch.allclose(generated, forced, atol=1e-4) and not torch.allclose(generated, base, atol=1e-2)
    generated, forced, base = routed["prompt_experts"]
    assert torch.allclose(generated, base, atol=1e-5), "the prompt reached no expert, so no generated token does"
    assert not torch.allclose(forced, base, atol=1e-2), "one forward pass over the same tokens routes each freely"


def test_left_padded_batch_generation_matches_single_prompts():
    model, prompt = _edited_model()
    other = token_batch(1, 4, seed=11)
    with torch.no_grad():
        single = model.generate(prompt, max_new_tokens=5, do_sample=False)[0, prompt.shape[1] :]
        padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), other], dim=1)
        batch = torch.cat([prompt, padded])
        mask = torch.ones_like(batch)
        mask[1, :2] = 0
        batched = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False)[0, batch.shape[1] :]
    assert torch.equal(single, batched)


@pytest.mark.parametrize("model_type", ["llama", "opt"])  # OPT flattens the batch's tokens before its FFN
def test_a_left_padded_forward_pass_routes_each_row_as_alone(model_type):
    model = get_peft_model(tiny_model(model_type), LEMoEConfig(task_type="CAUSAL_LM"))
    prompt = token_batch(1, 6, seed=3)
    give_expert(model, prompt, scale=3.0)
    batch = torch.cat([torch.cat([torch.zeros(1, 2, dtype=torch.long), prompt[:, 2:]], dim=1), prompt])
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    with torch.no_grad():
        alone = model(input_ids=prompt[:, 2:]).logits[0]
        padded = model(input_ids=batch, attention_mask=mask).logits
        with model.disable_adapter():
            base = model(input_ids=prompt).logits[0]
    assert torch.allclose(padded[0, 2:], alone, atol=1e-4)
    assert not torch.allclose(padded[1], base, atol=1e-2), "the expert is active on its anchored sequence"


def test_subject_presence_is_a_running_max_that_skips_the_first_token_and_padding():
    scores = torch.tensor([[[0.75], [0.25], [0.5], [0.125]]])  # (B=1, T=4, S=1)
    valid = torch.tensor([[True, True, True, False]])
    counts = token_counts(scores, valid)
    best = subject_presence(scores, counts, valid)
    assert best[0, :, 0].tolist() == [float("-inf"), 0.25, 0.5, 0.5], "the first token and padding never count"
    first = subject_presence(scores[:, :2], counts[:, :2], valid[:, :2])
    rest = subject_presence(scores[:, 2:], counts[:, 2:], valid[:, 2:], prefix=first[:, -1])
    assert torch.equal(torch.cat([first, rest], dim=1), best), "continuing from a prefix is exact"


def test_subject_margin_lets_a_token_read_only_its_nearest_subjects():
    # (B=1, T=3, S=3): token 1 matches subject 0 best and subject 1 nearly as well; token 2 matches subject 2 best
    scores = torch.tensor([[[0.0, 0.0, 0.0], [0.9, 0.85, 0.7], [0.6, 0.8, 0.95]]])
    counts = token_counts(scores, None)
    assert subject_presence(scores, counts, None)[0, -1].tolist() == pytest.approx([0.9, 0.85, 0.95])
    nearest = subject_presence(scores, counts, None, margin=0.0)
    assert nearest[0, -1].tolist() == pytest.approx([0.9, float("-inf"), 0.95]), "subject 1 is never the best match"
    within = subject_presence(scores, counts, None, margin=0.1)
    assert within[0, -1].tolist() == pytest.approx([0.9, 0.85, 0.95]), "a match within the margin still counts"
    first = subject_presence(scores[:, :2], counts[:, :2], None, margin=0.0)
    rest = subject_presence(scores[:, 2:], counts[:, 2:], None, prefix=first[:, -1], margin=0.0)
    assert torch.equal(torch.cat([first, rest], dim=1), nearest), "continuing from a prefix is exact"


def test_named_subjects_finds_names_where_they_end_across_calls_and_never_across_padding():
    ids = torch.tensor([[5, 7, 9, 7, 9, 3]])
    names = torch.tensor([[-1, 7, 9], [-1, -1, -1], [3, 7, 9], [-1, -1, 3]])  # "7 9", none, "3 7 9", "3"
    named, recent = named_subjects(ids, names)
    assert named[0].nonzero().tolist() == [[2, 0], [4, 0], [5, 3]]
    assert recent.tolist() == [[9, 3]], "the last L - 1 ids, where a name may begin"
    first, recent = named_subjects(ids[:, :2], names)
    rest, _ = named_subjects(ids[:, 2:], names, recent=recent)
    assert torch.equal(torch.cat([first, rest], dim=1), named), "a name split across two calls is found"
    padded, _ = named_subjects(ids, names, valid=torch.tensor([[True, False, True, True, True, True]]))
    assert padded[0].nonzero().tolist() == [[4, 0], [5, 3]], "padding breaks the name it falls in"


def test_named_subjects_compares_only_the_names_that_can_end_here_and_finds_what_comparing_all_finds(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (2, 40), generator=generator)
    names = torch.randint(0, 6, (300, 3), generator=generator)
    names[::3, 0] = -1  # some two-id names
    names[::7] = -1  # some rows name nothing
    names[100:, -1] = torch.randint(6, 9, (200,), generator=generator)  # ids the text never holds
    fast, _ = named_subjects(ids, names)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # every name, every column
    every, _ = named_subjects(ids, names)
    assert fast.any() and torch.equal(fast, every)


def test_a_named_subject_scores_one_from_where_its_name_ends():
    scores = torch.tensor([[[0.0, 0.0], [0.75, 0.25], [0.5, 0.375]]])  # (B=1, T=3, S=2)
    named = torch.tensor([[[False, True], [False, False], [False, False]]])
    best = subject_presence(scores, token_counts(scores, None), None, margin=0.0, named=named)
    assert best[0].tolist() == [[float("-inf"), 1.0], [0.75, 1.0], [0.75, 1.0]], "a name counts on the first token"
    unnamed = subject_presence(scores, token_counts(scores, None), None, margin=0.0)
    assert unnamed[0, -1].tolist() == [0.75, float("-inf")], "without its name, subject 1 is never the nearest"


def _new_expert_keyed_at_every_token(texts: torch.Tensor, **config):
    """A tiny model (token queries) whose routing is calibrated and whose expert 0 no text below reaches, a new
    expert without anchors, and the inputs (B, T, d) of ``texts`` at the LEMoE layer with their queries (B, T, k):
    the model, the layer, the inputs, the new expert and the queries."""
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", route_pooling="token", **config))
    give_expert(model, token_batch(1, 5, seed=70), subject_position=2)
    tuner = model.base_model
    ((name, layer),) = tuner.lemoe_layers().items()
    with torch.no_grad(), tuner.capture_layer_inputs() as captured:
        model(input_ids=texts)
    inputs = captured[name][0]
    keys = layer.route_queries("default", layer.pooled_queries("default", inputs))
    return model, layer, inputs, tuner.add_expert(), keys


@pytest.mark.parametrize(("names", "opens_at"), [("off", 3), ("also", 3), ("only", 6)])
def test_route_subject_names_says_whether_a_subject_is_read_by_key_name_or_either(names, opens_at):
    """One expert anchored at every token of a text, its anchors gated twice: by subject 0, read by its key (the
    text's token 3), and by subject 1, read by its name only (the text's ids 5-6; its key is a zero vector)."""
    text = token_batch(1, 8, seed=71)
    model, layer, inputs, expert, keys = _new_expert_keyed_at_every_token(text, route_subject_names=names)
    tuner, name = model.base_model, next(iter(model.base_model.lemoe_layers()))
    keys = keys[0]
    key = layer.subject_queries("default", inputs[0, 3:4])
    subjects = torch.cat([key, torch.zeros_like(key)])
    tuner.add_anchors(
        expert, {name: torch.cat([keys, keys])}, subjects={name: subjects},
        key_subject=torch.tensor([0] * 8 + [1] * 8), subject_names=[[], text[0, 5:7].tolist()],
    )  # fmt: skip
    assert layer.lemoe_subject_names["default"][-1, -3:].tolist() == [-1, *text[0, 5:7].tolist()]
    experts, _ = layer.route_sequences("default", inputs, None, text)
    assert (experts[0, :opens_at, 0] == -1).all() and (experts[0, opens_at:, 0] == expert).all()
    with torch.no_grad():
        layer.lemoe_B["default"].normal_(std=3.0)
        routed = model(input_ids=text).logits
        with model.disable_adapter():
            base = model(input_ids=text).logits
    changed = (routed - base).abs().amax(dim=-1)[0] > 1e-6
    assert changed[opens_at:].all() and not changed[:opens_at].any(), "a forward pass reads names from its ids"
    tuner.remove_expert(0)  # renumbered subjects keep their names
    assert layer.lemoe_subject_names["default"][-1, -2:].tolist() == text[0, 5:7].tolist()


def test_generation_reads_a_name_split_between_prompt_and_generated_tokens_like_one_pass():
    config = LEMoEConfig(
        task_type="CAUSAL_LM", route_subject_names="only", route_generated_tokens="any", route_pooling="token"
    )
    model = get_peft_model(tiny_model(), config)
    prompt = token_batch(1, 6, seed=3)
    with torch.no_grad():
        continuation = model.generate(prompt, max_new_tokens=6, do_sample=False)
    give_expert(model, continuation, scale=3.0, subject_position=1)
    (layer,) = model.base_model.lemoe_layers().values()
    layer.lemoe_subject_names["default"][0, -3:] = continuation[0, 5:8]  # the prompt's last and two generated ids
    generated, forced, base = _generated_forced_and_base(model, prompt)
    assert torch.allclose(generated, forced, atol=1e-4)
    assert torch.allclose(forced[:2], base[:2]) and not torch.allclose(forced[2:], base[2:], atol=1e-2)


@pytest.mark.parametrize("pooling", ["causal_mean", "mean_and_token"])
def test_generation_leaves_out_a_name_split_between_prompt_and_generated_tokens_like_one_pass(pooling):
    """The anchors are the one-pass queries with a name left out, at a threshold only an exact query reaches: the
    generated tokens route like teacher forcing only if the name's tokens from earlier calls leave their mean too."""
    config = LEMoEConfig(
        task_type="CAUSAL_LM", route_pooling=pooling, route_generated_tokens="any", route_subject_tokens="left_out"
    )
    model = get_peft_model(tiny_model(), config)
    prompt = token_batch(1, 6, seed=3)
    with torch.no_grad():
        continuation = model.generate(prompt, max_new_tokens=6, do_sample=False)
    give_expert(model, continuation, scale=3.0, subject_position=1)
    ((name, layer),) = model.base_model.lemoe_layers().items()
    layer.lemoe_subject_names["default"][0, -3:] = continuation[0, 5:8]  # the prompt's last and two generated ids
    with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
        model(continuation)
    pooled = layer.pooled_queries("default", *captured[name])
    layer.lemoe_keys["default"][:] = layer.route_queries("default", pooled)[0]
    layer.lemoe_key_threshold["default"][:] = 0.9999
    generated, forced, base = _generated_forced_and_base(model, prompt)
    assert torch.allclose(generated, forced, atol=1e-4)
    assert not torch.allclose(forced[2:], base[2:], atol=1e-2), "the tokens after the name were routed"
    settings = layer.lemoe_settings["default"]
    layer.lemoe_settings["default"] = dataclasses.replace(settings, subject_tokens="pooled")
    kept = layer.pooled_queries("default", *captured[name])
    assert torch.equal(kept[0, :7], pooled[0, :7]) and not torch.allclose(kept[0, 7:], pooled[0, 7:])


def _gated_model(subject_position: int, pooling: str = "causal_mean", names: str = "only"):
    """A tiny model with one expert anchored at every position of a generated sequence, gated by the subject taken
    at ``subject_position`` of that sequence (read by name, by its key, or either: ``names``)."""
    config = LEMoEConfig(task_type="CAUSAL_LM", route_pooling=pooling, route_subject_names=names)
    model = get_peft_model(tiny_model(), config)
    prompt = token_batch(1, 6, seed=3)
    with torch.no_grad():
        continuation = model.generate(prompt, max_new_tokens=6, do_sample=False)
    give_expert(model, continuation, scale=3.0, subject_position=subject_position)
    return model, prompt, continuation


@pytest.mark.parametrize("names", ["off", "only"])
def test_an_anchor_gated_by_a_subject_serves_no_token_before_the_subject(names):
    model, _, continuation = _gated_model(subject_position=3, names=names)
    tuner = model.base_model
    with torch.no_grad(), tuner.capture_layer_inputs() as captured:
        model(input_ids=continuation)
    ((name, layer),) = tuner.lemoe_layers().items()
    experts, _ = layer.route_sequences("default", *captured[name])
    assert (experts[0, :3, 0] == -1).all(), "before the subject is read its anchors are closed"
    assert (experts[0, 3:, 0] == 0).all(), "from the subject on, the anchors route as before"
    assert model.peft_config["default"].num_subjects == 1


@pytest.mark.parametrize("names", ["off", "only"])
@pytest.mark.parametrize("pooling", ["causal_mean", "mean_and_token"])
def test_generation_with_a_subject_gate_routes_like_teacher_forcing(pooling, names):
    model, prompt, _ = _gated_model(subject_position=2, pooling=pooling, names=names)
    generated, forced, base = _generated_forced_and_base(model, prompt)
    assert torch.allclose(generated, forced, atol=1e-4)
    assert not torch.allclose(forced, base, atol=1e-3), "the generation was routed to an expert"


def test_generation_with_nearest_subject_gating_routes_like_teacher_forcing():
    config = LEMoEConfig(task_type="CAUSAL_LM", route_subject_margin=0.0, route_subject_names="off")
    model = get_peft_model(tiny_model(), config)
    for seed in range(4):
        give_expert(model, token_batch(1, 7, seed=40 + seed), scale=3.0, subject_position=2 + seed % 3)
    prompt = token_batch(1, 7, seed=41)[:, :5]  # an anchored sequence up to two tokens past its subject
    generated, forced, base = _generated_forced_and_base(model, prompt)
    assert torch.allclose(generated, forced, atol=1e-4)
    assert not torch.allclose(forced, base, atol=1e-3), "the generation was routed to an expert"


def test_removing_an_expert_keeps_the_other_experts_subject_gates():
    model, _, continuation = _gated_model(subject_position=3)
    tuner = model.base_model
    give_expert(model, token_batch(1, 5, seed=21))  # expert 1, ungated
    (layer,) = tuner.lemoe_layers().values()
    tuner.remove_expert(0)
    assert model.peft_config["default"].num_subjects == 0 and layer.lemoe_subjects["default"].shape[0] == 0
    assert (layer.lemoe_key_subject["default"] == -1).all() and (layer.lemoe_key_expert["default"] == 0).all()


@pytest.mark.parametrize("alias", [[0, 0], [0, 1]])
def test_a_subject_is_read_through_any_of_its_keys(alias):
    """One expert anchored on two texts, every anchor gated by subject 0, whose key is text A's token 3; text B's
    token 2 is a second key, read as subject 0 ([0, 0]) or as a subject of its own ([0, 1])."""
    model, layer, inputs, expert, keys = _new_expert_keyed_at_every_token(token_batch(2, 6, seed=71))
    tuner, name = model.base_model, next(iter(model.base_model.lemoe_layers()))
    keys = keys.flatten(0, 1)
    subjects = layer.subject_queries("default", torch.stack([inputs[0, 3], inputs[1, 2]]))
    tuner.add_anchors(
        expert, {name: keys}, subjects={name: subjects}, key_subject=torch.zeros(12, dtype=torch.long),
        subject_alias=torch.tensor(alias),
    )  # fmt: skip
    experts, _ = layer.route_sequences("default", inputs)
    assert (experts[0, 3:, 0] == expert).all() and (experts[:, :2, 0] == -1).all()
    assert ((experts[1, 2:, 0] == expert).all()) == (alias == [0, 0]), "B reads subject 0 through its second key"
    assert layer.lemoe_subject_alias["default"].tolist() == [0, *(a + 1 for a in alias)]
    tuner.remove_expert(0)  # the subjects are renumbered; what they read is kept
    assert layer.lemoe_subject_alias["default"].tolist() == alias
    assert torch.equal(layer.route_sequences("default", inputs)[0], experts - 1 + (experts < 0).long())


def _seven_experts_and_a_text():
    """Six gated experts and one ungated, and a text that names one of the six subjects: the layer and the text's
    layer inputs (with its ids)."""
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    for seed in range(6):  # most anchors' subjects are not in the text below
        give_expert(model, token_batch(1, 7, seed=40 + seed), subject_position=2 + seed % 4)
    give_expert(model, token_batch(1, 5, seed=60))
    text = torch.cat([token_batch(1, 7, seed=43), token_batch(1, 5, seed=60)], dim=1)
    with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
        model(input_ids=text)
    ((name, layer),) = model.base_model.lemoe_layers().items()
    return layer, captured[name]


def test_scoring_only_the_read_subjects_anchors_routes_exactly_like_scoring_all(monkeypatch):
    layer, inputs = _seven_experts_and_a_text()
    sparse = layer.route_sequences("default", *inputs)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the dense path torch.compile traces
    dense = layer.route_sequences("default", *inputs)
    assert all(torch.equal(a, b) for a, b in zip(sparse, dense, strict=True))
    assert (sparse[0] >= 0).any() and (sparse[0] == -1).any(), "the text reaches some experts, not all tokens"


def test_gated_anchor_scores_reduced_per_expert_route_like_a_forward_pass():
    layer, inputs = _seven_experts_and_a_text()
    scores = layer.anchor_scores("default", *inputs)
    passed = scores.masked_fill(scores < layer.lemoe_key_threshold["default"], float("-inf"))
    settings = layer.lemoe_settings["default"]
    experts = experts_from_scores(
        passed, layer.lemoe_key_expert["default"], layer.num_experts("default"), settings.top_k, settings.temperature
    )
    routed = layer.route_sequences("default", *inputs)
    assert all(torch.equal(a, b) for a, b in zip(experts, routed, strict=True))
    closed = torch.isinf(scores[0, -1]) & (layer.lemoe_key_subject["default"] >= 0)
    assert closed.any() and torch.isfinite(scores[0, -1]).any(), "the gate closes the anchors of unread subjects"


def test_keys_live_in_a_space_of_route_key_dim_dimensions():
    config = LEMoEConfig(task_type="CAUSAL_LM", route_key_dim=16, route_pooling="causal_mean")
    model = get_peft_model(tiny_model(), config)
    give_expert(model, token_batch(1, 6, seed=5), subject_position=2)
    (layer,) = model.base_model.lemoe_layers().values()
    assert layer.lemoe_keys["default"].shape[1] == 16 and layer.lemoe_subjects["default"].shape[1] == 16
    assert layer.lemoe_route_projection["default"].shape == (layer.in_features, 16)
    with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
        model(input_ids=token_batch(1, 6, seed=5))
    experts, _ = layer.route_sequences("default", *captured[next(iter(captured))])
    assert (experts[0, 2:, 0] == 0).all(), "the anchored sequence still routes to its expert in the reduced space"


def test_mean_and_token_queries_score_a_weighted_sum_of_the_two_cosines():
    config = dict(route_pooling="mean_and_token", route_token_weight=0.25, route_key_dim=16)
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", **config))
    anchored = token_batch(1, 6, seed=5)
    give_expert(model, anchored, subject_position=2)
    (layer,) = model.base_model.lemoe_layers().values()
    assert layer.lemoe_keys["default"].shape[1] == 16, "route_key_dim is the width of a key, both halves together"
    assert layer.lemoe_subjects["default"].shape[1] == 8 and layer.lemoe_route_projection["default"].shape[1] == 8
    with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
        model(input_ids=token_batch(1, 7, seed=6))
    x, valid, _ = captured[next(iter(captured))]
    score = layer.route_queries("default", layer.pooled_queries("default", x, valid)) @ layer.lemoe_keys["default"].T
    stats = layer.lemoe_route_mean["default"], layer.lemoe_route_projection["default"]
    key_means, key_tokens = (whiten(part, *stats, normalize=True) for part in _raw_parts(model, layer, anchored))
    means, tokens = whiten(causal_mean(x)[0], *stats, normalize=True), whiten(x, *stats, normalize=True)
    expected = 0.75 * means @ key_means.T + 0.25 * tokens @ key_tokens.T
    assert torch.allclose(score, expected, atol=1e-5)


def _raw_parts(model, layer, input_ids):
    """Running means and tokens (T, d_in) of ``input_ids`` at ``layer``'s input."""
    with torch.no_grad(), model.base_model.capture_layer_inputs() as captured:
        model(input_ids=input_ids)
    x = captured[next(iter(captured))][0]
    return causal_mean(x)[0][0], x[0]
