"""Crash-safe checkpoints of a LEMoE adapter folder.

``save_checkpoint`` writes the whole adapter folder (``adapter_config.json`` with its edit log,
``adapter_model.safetensors``) into a temporary sibling folder, then swaps it in with renames, so a kill at any moment
leaves either the previous complete checkpoint or the new one, never a mix. ``restore_checkpoint`` loads a checkpoint
into a live PEFT model whose adapter holds fewer batches, which is how an interrupted stream resumes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from .adapter_file import ADAPTER_WEIGHTS
from .config import LEMoEConfig

logger = logging.getLogger(__name__)

_SHAPE_FIELDS = ("num_experts", "num_anchors", "num_subjects", "route_calibration_size", "route_vocab_size")
# config fields that save_pretrained fills in or that describe the run, not the adapter's architecture
_NOT_ARCHITECTURE = (
    "edit_log",
    "inference_mode",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
)


def _recover(directory: Path) -> None:
    """Finish a swap that a crash interrupted: the previous checkpoint is moved back in place."""
    previous = directory.with_name(directory.name + ".previous")
    if not directory.exists() and previous.exists():
        os.replace(previous, directory)
    elif previous.exists():
        shutil.rmtree(previous)


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a complete checkpoint, after finishing a swap that a crash interrupted."""
    directory = Path(directory)
    _recover(directory)
    return (directory / "adapter_config.json").is_file() and (directory / ADAPTER_WEIGHTS).is_file()


def save_checkpoint(model: PeftModel, directory: str | os.PathLike, adapter_name: str) -> None:
    """Atomically replace ``directory`` with a fresh ``save_pretrained`` of ``adapter_name``."""
    directory = Path(directory)
    _recover(directory)
    staging = directory.with_name(directory.name + ".staging")
    previous = directory.with_name(directory.name + ".previous")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), selected_adapters=[adapter_name], save_embedding_layers=False)
    source = staging / adapter_name if adapter_name != "default" else staging
    for path in source.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    if directory.exists():
        os.replace(directory, previous)
    os.replace(source, directory)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def restore_checkpoint(model: PeftModel, directory: str | os.PathLike, adapter_name: str) -> None:
    """Load the checkpoint in ``directory`` into ``model``'s adapter ``adapter_name``, resizing it to match."""
    directory = Path(directory)
    saved = LEMoEConfig.from_pretrained(str(directory))
    current = model.peft_config[adapter_name]
    differences = [
        name
        for name, value in vars(saved).items()
        if name not in (*_SHAPE_FIELDS, *_NOT_ARCHITECTURE) and getattr(current, name, None) != value
    ]
    if differences:
        raise ValueError(
            f"The checkpoint in {directory} was made with another LEMoE configuration ({', '.join(differences)} "
            "differ); resume with the same settings or start a new output folder."
        )
    for name in _SHAPE_FIELDS:
        setattr(current, name, getattr(saved, name))
    current.edit_log = saved.edit_log
    for layer in model.base_model.lemoe_layers(adapter_name).values():
        layer.update_layer(adapter_name, current)
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    logger.info("Resumed from %s: %d experts, %d edited batches.", directory, current.num_experts, len(saved.edit_log))
