"""Models larger than memory: a model loaded with accelerate's big-model inference, part of it in CPU memory and the
rest (the LEMoE layer included) offloaded to disk, edits, generates, saves and reloads exactly like the same model in
memory. ``PeftModel.from_pretrained`` re-dispatches an offloaded model and fails on a machine without a GPU (for
every PEFT tuner); an adapter is loaded into an offloaded model with ``restore_checkpoint`` instead."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from lemoe_peft import LEMoEConfig, LEMoEEditor, load_edit_requests
from lemoe_peft.checkpoint import restore_checkpoint
from lemoe_peft.layer import offload_execution_device

from .helpers import tiny_model, tiny_tokenizer
from .test_editor import REQUESTS
from .test_real_model import ZSRE, _require_real_model

TINY_DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "cpu",
    "model.layers.2": "disk",
    "model.layers.3": "disk",  # the LEMoE layer
    "model.norm": "disk",
    "lm_head": "disk",
}


def _edit_and_generate(base, tokenizer, requests, settings):
    model = get_peft_model(base, LEMoEConfig(task_type="CAUSAL_LM"))
    LEMoEEditor(model, tokenizer, **settings).edit(requests, progress=False)
    return model, _generate(model, tokenizer, requests)


def _generate(model, tokenizer, requests):
    outputs = []
    for request in requests:
        tokens = tokenizer(request.prompt, return_tensors="pt")
        outputs.append(model.generate(**tokens, max_new_tokens=6, do_sample=False)[0].tolist())
    return outputs


def _check_offloaded_matches(folder, tokenizer, requests, settings, tmp_path, **offload):
    """Edit the model in memory and offloaded; both generate the same tokens and hold the same adapter, which also
    reloads into a fresh offloaded model."""
    in_memory, expected = _edit_and_generate(
        AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer, requests, settings
    )
    offloaded = AutoModelForCausalLM.from_pretrained(folder, offload_folder=tmp_path / "offload", **offload).eval()
    assert "disk" in offloaded.hf_device_map.values(), offloaded.hf_device_map
    offloaded, generated = _edit_and_generate(offloaded, tokenizer, requests, settings)
    layers = offloaded.base_model.lemoe_layers().values()
    assert all(offload_execution_device(layer.get_base_layer()) for layer in layers), "the LEMoE layer is on disk"
    assert generated == expected
    state = offloaded.base_model.model.state_dict()
    for name, tensor in in_memory.base_model.model.state_dict().items():
        if ".lemoe_" in name:
            assert torch.equal(state[name], tensor), name

    in_memory.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(folder, offload_folder=tmp_path / "offload-2", **offload).eval()
    reloaded = get_peft_model(fresh, LEMoEConfig.from_pretrained(tmp_path / "adapter"))
    restore_checkpoint(reloaded, tmp_path / "adapter", "default")
    assert _generate(reloaded, tokenizer, requests) == expected


@pytest.mark.parametrize(
    "offload",
    [{"device_map": TINY_DEVICE_MAP}, {"device_map": "auto", "max_memory": {"cpu": "1KB"}}],
    ids=["cpu-and-disk", "all-on-disk"],
)
def test_offloaded_tiny_model_edits_like_the_model_in_memory(tmp_path, offload):
    tiny_model().save_pretrained(tmp_path / "base")
    settings = {"batch_size": 3, "max_steps": 10}
    _check_offloaded_matches(tmp_path / "base", tiny_tokenizer(), REQUESTS[:6], settings, tmp_path, **offload)


@pytest.mark.real_model
def test_offloaded_smollm2_edits_like_the_model_in_memory(tmp_path):
    """SmolLM2 in 300 MB of CPU memory, the rest (layers 12-29, the LEMoE layer 24 among them) on disk. Offloading
    needs plain weights, so the GGUF model is first saved dequantized to float32 safetensors."""
    _require_real_model()
    from lemoe_peft.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2")
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(tmp_path / "smollm2")
    del model, plain
    requests = load_edit_requests(ZSRE, limit=5)
    settings = {"batch_size": 5, "max_steps": 5}
    offload = {"device_map": "auto", "max_memory": {"cpu": "300MB"}}  # layers 0-11 in memory, 12-29 on disk
    _check_offloaded_matches(tmp_path / "smollm2", tokenizer, requests, settings, tmp_path, **offload)
