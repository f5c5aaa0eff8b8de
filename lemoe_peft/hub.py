"""The LEMoE model card, and uploading an adapter folder with it to the Hugging Face Hub."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard

CARD_START, CARD_END = "<!-- lemoe:start -->", "<!-- lemoe:end -->"
CARD_TAGS = ("lemoe", "model-editing")


def target_module_names(target_modules: str | list[str] | set[str] | None) -> list[str]:
    """``target_modules`` for display: a regular expression stays whole, names are sorted."""
    if isinstance(target_modules, str):
        return [target_modules]
    return sorted(target_modules or [])


def card_section(config: Any) -> str:
    """A model-card section saying what the adapter is: base model, where it sits, experts and edits."""
    edits = sum(len(batch["requests"]) for batch in config.edit_log)
    targets = ", ".join(f"`{t}`" for t in target_module_names(config.target_modules))
    layers = config.layers_to_transform if config.layers_to_transform is not None else "all matching"
    base = config.base_model_name_or_path or "(not recorded)"
    return f"""{CARD_START}
## LEMoE knowledge-edit adapter

Lifelong knowledge edits of `{base}`, stored as a LEMoE mixture-of-experts adaptor (Wang & Li, EMNLP 2024,
arXiv:2406.20030) with the `lemoe-peft` library: one expert per batch of edits,
routed by anchor keys; inputs far from every anchor keep the base model's output.

- Base model: `{base}`
- Adaptor beside: {targets} in layers {layers}
- Experts: {config.num_experts} (rank {config.expert_rank}), anchor keys: {config.num_anchors}
- Edits: {edits} in {len(config.edit_log)} batches (listed in the `edit_log` of `adapter_config.json`)

```python
import lemoe_peft  # registers the LEMOE adapter type with PEFT
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "<this repository or folder>")
```

Without `import lemoe_peft`, PEFT cannot resolve the adapter type and stops with `KeyError: 'LEMOE'`.
{CARD_END}"""


def write_card(directory: str | Path, config: Any) -> None:
    """Write the LEMoE section and metadata (base model, ``library_name: peft``, tags) into the Hugging Face model card
    ``README.md`` in ``directory``, keeping what else it holds (PEFT's card, an older LEMoE section is replaced)."""
    path = Path(directory) / "README.md"
    card = ModelCard(path.read_text(encoding="utf-8") if path.is_file() else "---\n---\n")
    card.data.library_name = "peft"
    if config.base_model_name_or_path:
        card.data.base_model = config.base_model_name_or_path
    card.data.tags = sorted({*(card.data.tags or []), *CARD_TAGS})
    if config.task_type == "CAUSAL_LM" and not card.data.pipeline_tag:
        card.data.pipeline_tag = "text-generation"
    section = card_section(config)
    pattern = re.compile(re.escape(CARD_START) + ".*?" + re.escape(CARD_END), re.DOTALL)
    text = card.text
    card.text = pattern.sub(lambda _: section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}\n"
    card.save(path)


def push_to_hub(
    model: Any, repo_id: str, *, private: bool | None = None, token: str | None = None, **kwargs: Any
) -> Any:
    """Upload ``model``'s adapters with the LEMoE model card that ``save_pretrained`` writes.

    ``model.push_to_hub(repo_id)`` uploads the same files, but transformers uploads the repository's existing card
    (tagged) instead of the one ``save_pretrained`` wrote, or, on a first push, its generic card.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs)
