"""Every supported architecture, with default targets: exact base outputs without experts, routed experts, and a
bit-exact save/load round trip under another adapter name."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import LEMoEConfig, LEMoELinear
from lemoe_peft.config import DEFAULT_TARGET_MODULES

from .helpers import TINY_CONFIGS, give_expert, tiny_model, token_batch


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_default_targets_round_trip(model_type, tmp_path):
    inputs = token_batch()
    base_logits = tiny_model(model_type)(inputs).logits

    model = get_peft_model(tiny_model(model_type), LEMoEConfig(task_type="CAUSAL_LM"))
    layers = model.base_model.lemoe_layers()
    assert len(layers) == 1
    (name,) = layers
    assert f".3.{DEFAULT_TARGET_MODULES[model_type][0]}" in f".{name}"  # int(0.8 * 4 layers) = layer 3
    assert isinstance(layers[name], LEMoELinear)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, base_logits), "no experts must mean exactly the base model"

    give_expert(model, inputs)
    give_expert(model, token_batch(seed=5))
    with torch.no_grad():
        edited = model(inputs).logits
    assert not torch.allclose(edited, base_logits), "anchored inputs must be routed to an expert"

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model(model_type), tmp_path, adapter_name="other")
    assert reloaded.peft_config["other"].num_experts == 2
    with torch.no_grad():
        assert torch.equal(reloaded(inputs).logits, edited)
