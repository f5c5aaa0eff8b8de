"""The routed forward is static: torch.compile traces it without graph breaks and gives the eager outputs, and
mixing gathers the chosen experts exactly as a per-token loop would."""

import pytest
import torch
from peft import get_peft_model

from lemoe_peft import LEMoEConfig

from .helpers import give_expert, tiny_model, token_batch

INPUTS = token_batch()


def _reference_mix(layer, name, x, experts, weights):
    """Each token's chosen experts one by one: weight * B act(A x)."""
    newest = layer.num_experts(name) - 1
    rows = []
    tokens, slots = x.reshape(-1, x.shape[-1]), zip(experts.flatten(0, -2), weights.flatten(0, -2), strict=True)
    for token, (chosen, mixing) in zip(tokens, slots, strict=True):
        row = torch.zeros(layer.out_features)
        for expert, weight in zip(chosen.tolist(), mixing, strict=True):
            if expert >= 0:
                a, b = (
                    layer.newest_expert(name)
                    if expert == newest
                    else (layer.lemoe_frozen_A[name][expert], layer.lemoe_frozen_B[name][expert])
                )
                row += weight * (torch.nn.functional.silu(token @ a) @ b)
        rows.append(row)
    return torch.stack(rows).view(*x.shape[:-1], -1)


def test_mix_experts_matches_a_per_token_loop():
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", top_k=2))
    for seed in range(5):
        give_expert(model, token_batch(seed=seed))
    layer = next(iter(model.base_model.lemoe_layers().values()))
    x = torch.randn(3, 9, layer.in_features)
    generator = torch.Generator().manual_seed(0)
    experts = torch.randint(-1, 5, (3, 9, 2), generator=generator)
    weights = torch.rand(3, 9, 2, generator=generator).masked_fill(experts < 0, 0.0)
    with torch.no_grad():
        got = layer.mix_experts("default", x, experts, weights)
    torch.testing.assert_close(got, _reference_mix(layer, "default", x, experts, weights), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def edited():
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    give_expert(model, INPUTS)
    give_expert(model, token_batch(seed=5))
    return model


def test_the_routed_forward_has_no_graph_breaks(edited):
    torch._dynamo.reset()
    mask = torch.ones_like(INPUTS)
    mask[0, :3] = 0  # left padding

    def forward(ids, attention_mask):
        return edited(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits

    with torch.no_grad():
        explanation = torch._dynamo.explain(forward)(INPUTS, mask)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_a_compiled_model_gives_the_eager_outputs(edited):
    torch._dynamo.reset()
    mask = torch.ones_like(INPUTS)
    mask[1, :2] = 0
    with torch.no_grad():
        eager = edited(input_ids=INPUTS, attention_mask=mask).logits
        compiled = torch.compile(edited, backend="eager", fullgraph=False)
        torch.testing.assert_close(compiled(input_ids=INPUTS, attention_mask=mask).logits, eager)
