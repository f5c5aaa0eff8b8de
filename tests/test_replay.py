"""Training forwards skip the frozen layers below the adaptor; the result must equal a full forward."""

import pytest
import torch
from peft import get_peft_model

from lemoe_peft import LEMoEConfig
from lemoe_peft.replay import LowerLayerReplay, find_layer_list

from .helpers import give_expert, tiny_model, token_batch


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gpt_neox", "gemma3_text"])
def test_replayed_forward_equals_the_full_forward(model_type):
    model = get_peft_model(tiny_model(model_type), LEMoEConfig(task_type="CAUSAL_LM"))
    inputs = token_batch()
    give_expert(model, inputs)
    layers = list(model.base_model.lemoe_layers())
    replay = LowerLayerReplay(model.base_model.model, layers)
    assert replay.depth == 3
    calls = []
    lower = replay.layers[0]
    handle = lower.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad(), replay.record():
        full = model(inputs).logits
    with torch.no_grad(), replay.replay():
        replayed = model(inputs).logits
    handle.remove()
    assert calls == [1], "the lower layers ran once, for the recording only"
    assert torch.allclose(replayed, full, atol=1e-6)
    assert replay.layers[0] is lower, "the real layers are back after replaying"


def test_layer_list_is_found_by_structure():
    model = tiny_model("gpt2")
    layers, index = find_layer_list(model, "transformer.h.2.mlp.c_proj")
    assert layers is model.transformer.h and index == 2
    assert find_layer_list(model, "lm_head") is None
