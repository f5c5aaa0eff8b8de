"""Every supported architecture, with default targets: exact base outputs without experts, routed experts, a
bit-exact save/load round trip under another adapter name, and the editor's passes."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from lemoe_peft import EditRequest, LEMoEConfig, LEMoEEditor, LEMoELinear
from lemoe_peft.config import DEFAULT_TARGET_MODULES

from .helpers import CALIBRATION, TINY_CONFIGS, give_expert, tiny_model, tiny_tokenizer, token_batch


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


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("names", ["only", "also"])  # "also" reads keys too: the lead pass runs
def test_the_editor_edits_every_architecture(model_type, names):
    config = LEMoEConfig(task_type="CAUSAL_LM", route_subject_names=names)
    model = get_peft_model(tiny_model(model_type), config)
    editor = LEMoEEditor(model, tiny_tokenizer(), calibration=CALIBRATION, max_steps=2)
    record = editor.edit_batch([EditRequest("the capital of france is", "rome", subject="france")])
    keys = {"only": 1, "also": 2}[names]  # in the prompt (and after the lead)
    assert record["steps"] >= 1 and model.peft_config["default"].num_subjects == keys
