"""Experts and anchors grow in amortized O(1): the stacks are prefix views of storage with spare rows, yet state_dict,
safetensors files, reloads, removal and copies see exactly the live rows."""

import copy

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lemoe_peft import LEMoEConfig
from lemoe_peft.layer import append_rows

from .helpers import give_expert, tiny_model, token_batch

INPUTS = token_batch()
KEY_WIDTH = 2 * 64  # mean and token halves, each the tiny model's full FFN width


def grown_model(experts: int = 5):
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM", expert_rank=4, init_weights=False))
    for seed in range(experts):
        give_expert(model, token_batch(seed=seed + 10))
    return model, next(iter(model.base_model.lemoe_layers().values()))


def test_append_rows_matches_cat_and_reallocates_logarithmically():
    buffer, reference, storages = torch.zeros(0, 3), torch.zeros(0, 3), set()
    for step in range(200):
        rows = torch.randn(step % 3 + 1, 3)
        buffer, reference = append_rows(buffer, rows), torch.cat([reference, rows])
        storages.add(buffer.untyped_storage().data_ptr())
        assert torch.equal(buffer, reference)
    assert len(storages) <= 10, "the storage doubles: about log2(rows) reallocations"
    assert torch.equal(append_rows(torch.zeros(2, dtype=torch.bfloat16), torch.ones(1)), torch.tensor([0.0, 0, 1]))


def test_appending_leaves_earlier_views_untouched():
    first = append_rows(torch.zeros(0, 2), torch.ones(1, 2))
    second = append_rows(first, torch.full((1, 2), 2.0))
    third = append_rows(first, torch.full((1, 2), 3.0))  # appending to an older prefix overwrites only its spare row
    assert torch.equal(first, torch.ones(1, 2)) and torch.equal(third[1], torch.full((2,), 3.0))
    assert second.shape == (2, 2)


def test_grown_stacks_save_only_live_rows_and_reload_bit_exact(tmp_path):
    model, layer = grown_model()
    assert layer.lemoe_keys["default"].untyped_storage().nbytes() > layer.lemoe_keys["default"].nbytes, "spare rows"
    with torch.no_grad():
        expected = model(INPUTS).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    shapes = {name.rsplit(".", 1)[-1]: tuple(tensor.shape) for name, tensor in saved.items()}
    assert shapes["lemoe_frozen_A"] == (4, 64, 4) and shapes["lemoe_frozen_B"] == (4, 4, 32)
    assert shapes["lemoe_keys"] == (5 * INPUTS.numel(), KEY_WIDTH)
    assert shapes["lemoe_key_expert"] == (5 * INPUTS.numel(),)
    state = model.base_model.model.state_dict()
    assert state["model.layers.3.mlp.down_proj.lemoe_keys.default"].shape == (5 * INPUTS.numel(), KEY_WIDTH)
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(INPUTS).logits, expected)
    give_expert(reloaded, INPUTS)  # a reloaded (exact-size) stack grows again
    assert reloaded.peft_config["default"].num_experts == 6


def test_remove_replace_and_copies_after_growth():
    model, layer = grown_model()
    frozen = layer.lemoe_frozen_A["default"].clone()
    copied = copy.deepcopy(model)
    model.base_model.remove_expert(4)
    assert torch.equal(layer.lemoe_A["default"], frozen[3]) and torch.equal(layer.lemoe_frozen_A["default"], frozen[:3])
    give_expert(model, INPUTS)
    assert torch.equal(layer.lemoe_frozen_A["default"][:4], frozen[:4]), "the re-added newest expert froze in place"
    assert layer.lemoe_keys["default"].shape[0] == model.peft_config["default"].num_anchors
    keys = {name: torch.ones(INPUTS.numel(), KEY_WIDTH) for name in model.base_model.lemoe_layers()}
    model.base_model.replace_anchors(4, keys)
    assert torch.equal(layer.lemoe_keys["default"][-INPUTS.numel() :], torch.ones(INPUTS.numel(), KEY_WIDTH))
    assert torch.equal(layer.lemoe_key_expert["default"][-INPUTS.numel() :], torch.full((INPUTS.numel(),), 4))
    copied_layer = next(iter(copied.base_model.lemoe_layers().values()))
    assert torch.equal(copied_layer.lemoe_frozen_A["default"], frozen), "a deep copy owns its own storage"
