"""PEFT's own test suite as a conformance check: the ``PeftCommonTester`` methods of the installed peft release
(taken from its source distribution, downloaded with pip into a cache on first use, never copied into this project)
run on LEMoE adapters of tiny Llama, GPT-2 and OPT models, fresh and with an expert that every token routes to.

``LEMOE_PEFT_TESTS`` may point at an unpacked ``peft-<version>/tests`` folder instead (offline machines)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTuner

from lemoe_peft import LEMoEConfig

from .helpers import tiny_model

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lemoe-peft" / f"peft-{peft.__version__}-tests"
MODELS = {"lemoe-tiny-llama": "llama", "lemoe-tiny-gpt2": "gpt2", "lemoe-tiny-opt": "opt"}
ADAPTERS = {
    "fresh": {"task_type": "CAUSAL_LM"},
    # one expert with random weights and a zero anchor key at threshold 0: every token routes to it
    "edited": {
        "task_type": "CAUSAL_LM",
        "num_experts": 1,
        "num_anchors": 1,
        "init_weights": False,
        "route_threshold": 0,
    },
}
MERGING = "merging is refused by design: routed experts do not fold into dense weights (use unload())"
FRESH = (
    "a fresh LEMoE adapter has no expert: no parameter (only routing buffers) and no effect on outputs. Experts are "
    "inserted per batch of edits (add_expert/open_expert); a trainable expert without anchors would never be routed to"
)
# (PeftCommonTester method, its extra arguments, reason to skip (or None), for which adapters)
CASES = [
    ("_test_model_attr", {}, None, ADAPTERS),
    ("_test_adapter_name", {}, FRESH, ["fresh"]),
    ("_test_adapter_name", {}, None, ["edited"]),
    ("_test_prepare_for_training", {}, FRESH, ["fresh"]),
    ("_test_prepare_for_training", {}, None, ["edited"]),
    ("_test_load_model_low_cpu_mem_usage", {}, FRESH, ["fresh"]),
    ("_test_load_model_low_cpu_mem_usage", {}, None, ["edited"]),
    ("_test_save_pretrained", {"safe_serialization": True}, None, ADAPTERS),
    ("_test_save_pretrained", {"safe_serialization": False}, None, ADAPTERS),
    ("_test_save_pretrained_selected_adapters", {}, None, ADAPTERS),
    ("_test_save_pretrained_adapter_name_substring", {}, None, ADAPTERS),
    ("_test_from_pretrained_config_construction", {}, None, ADAPTERS),
    ("_test_load_multiple_adapters", {}, None, ADAPTERS),
    ("_test_add_adapter_no_autocast_adapter_dtype", {"dtype": torch.bfloat16}, FRESH, ["fresh"]),
    ("_test_add_adapter_no_autocast_adapter_dtype", {"dtype": torch.bfloat16}, None, ["edited"]),
    ("_test_merge_layers", {}, MERGING, ADAPTERS),
    ("_test_safe_merge", {}, MERGING, ADAPTERS),
    ("_test_generate", {}, None, ADAPTERS),
    ("_test_generate_pos_args", {"raises_err": False}, None, ADAPTERS),
    ("_test_training", {}, FRESH, ["fresh"]),
    ("_test_training", {}, None, ["edited"]),
    ("_test_training_gradient_checkpointing", {"use_reentrant": True}, None, ["edited"]),
    ("_test_training_gradient_checkpointing", {"use_reentrant": False}, None, ["edited"]),
    ("_test_inference_safetensors", {}, FRESH, ["fresh"]),
    ("_test_inference_safetensors", {}, None, ["edited"]),
    ("_test_delete_adapter", {}, None, ADAPTERS),
    ("_test_delete_inactive_adapter", {}, None, ADAPTERS),
    ("_test_delete_unknown_adapter_raises", {}, None, ADAPTERS),
    ("_test_unload_adapter", {}, FRESH, ["fresh"]),
    ("_test_unload_adapter", {}, None, ["edited"]),
    ("_test_disable_adapter", {}, None, ["edited"]),
    ("_test_get_base_model_state_dict", {}, None, ADAPTERS),
]


def _peft_tests() -> Path | None:
    """The ``tests`` folder of the installed peft's sdist: from LEMOE_PEFT_TESTS, the cache, or pip download."""
    if os.environ.get("LEMOE_PEFT_TESTS"):
        return Path(os.environ["LEMOE_PEFT_TESTS"])
    if not (CACHE / "testing_common.py").exists():
        with tempfile.TemporaryDirectory() as download:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
            command += [f"peft=={peft.__version__}", "-d", download]
            if subprocess.run(command, capture_output=True, timeout=120).returncode != 0:
                return None
            (archive,) = Path(download).glob("peft-*.tar.gz")
            with tarfile.open(archive) as tar:
                for name in ("testing_common.py", "testing_utils.py"):
                    member = tar.getmember(f"peft-{peft.__version__}/tests/{name}")
                    CACHE.mkdir(parents=True, exist_ok=True)
                    (CACHE / name).write_bytes(tar.extractfile(member).read())
    return CACHE


def _tester_class() -> type:
    if not hasattr(BaseTuner, "_get_adapter_state_dict"):
        pytest.skip(f"the conformance cases were chosen against peft 0.21's test suite, not {peft.__version__}'s")
    folder = _peft_tests()
    if folder is None:
        pytest.skip(f"peft {peft.__version__}'s test suite could not be downloaded (offline?); set LEMOE_PEFT_TESTS")
    if "diffusers" not in sys.modules and importlib.util.find_spec("diffusers") is None:
        # only the Stable Diffusion tests use diffusers
        sys.modules["diffusers"] = types.SimpleNamespace(
            StableDiffusionPipeline=type("StableDiffusionPipeline", (), {})
        )
    package = types.ModuleType("peft_common_tests")
    package.__path__ = [str(folder)]
    sys.modules.setdefault("peft_common_tests", package)
    common = importlib.import_module("peft_common_tests.testing_common")

    class TinyModels:
        @staticmethod
        def from_pretrained(model_id: str, **kwargs) -> torch.nn.Module:
            model = tiny_model(MODELS[model_id])
            model.config._name_or_path = model.name_or_path = model_id
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            return model if dtype in (None, "auto") else model.to(dtype)

    class LEMoETester(common.PeftCommonTester):
        transformers_class = TinyModels
        torch_device = "cpu"

        def prepare_inputs_for_testing(self) -> dict[str, torch.Tensor]:
            return {
                "input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]),
                "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]]),
            }

    return LEMoETester


@pytest.fixture(scope="module")
def tester():
    return _tester_class()()


SLOW = {"_test_generate", "_test_generate_pos_args", "_test_disable_adapter"}  # run on Llama and OPT only (CI time)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    "model_id,method,arguments,skip,adapter",
    [
        (model_id, method, arguments, skip, adapter)
        for method, arguments, skip, adapters in CASES
        for adapter in adapters
        for model_id in MODELS
        if method not in SLOW or model_id != "lemoe-tiny-gpt2"
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_peft_common_tester(tester, model_id, method, arguments, skip, adapter):
    if skip:
        pytest.skip(skip)
    getattr(tester, method)(model_id, LEMoEConfig, dict(ADAPTERS[adapter]), **arguments)
