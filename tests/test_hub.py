"""Pushing to the Hub, tested offline by replacing the Hub client at its boundary with a folder."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
import transformers.utils.hub
from huggingface_hub.errors import EntryNotFoundError
from peft import PeftModel, get_peft_model

import lemoe_peft.hub
from lemoe_peft import LEMoEConfig

from .helpers import give_expert, tiny_model, token_batch

INPUTS = token_batch()


class FolderHub:
    """Stands in for ``huggingface_hub.HfApi``: every upload lands in a local folder."""

    def __init__(self, remote: Path, **kwargs):
        self.remote = remote
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, commit_message=None, **kwargs):
        for operation in operations:
            target = self.remote / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, target)
        self.commits.append(commit_message)

    def upload_folder(self, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, self.remote, dirs_exist_ok=True)
        self.commits.append(kwargs.get("commit_message", "upload_folder"))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FolderHub(tmp_path / "remote")
    monkeypatch.setattr(transformers.utils.hub, "hf_api", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kwargs: fake)

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README on the remote")

    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(no_remote_card))
    return fake


@pytest.fixture
def model():
    model = get_peft_model(tiny_model(), LEMoEConfig(task_type="CAUSAL_LM"))
    give_expert(model, INPUTS)
    return model


def _reload_matches(model, remote: Path) -> bool:
    reloaded = PeftModel.from_pretrained(tiny_model(), remote)
    with torch.no_grad():
        return torch.equal(reloaded(INPUTS).logits, model(INPUTS).logits)


def test_push_to_hub_uploads_a_reloadable_adapter(model, hub):
    model.push_to_hub("user/edits")
    uploaded = sorted(p.name for p in hub.remote.iterdir())
    assert uploaded == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert hub.commits == ["Upload model"]
    assert _reload_matches(model, hub.remote)


def test_lemoe_push_to_hub_keeps_the_lemoe_model_card(model, hub):
    requests = [{"prompt": p, "target_new": "x", "fingerprint": p} for p in ("p", "q")]
    model.peft_config["default"].edit_log = [{"expert": 0, "requests": requests}]
    lemoe_peft.hub.push_to_hub(model, "user/edits", commit_message="Add 2 edits")
    card = (hub.remote / "README.md").read_text()
    assert "LEMoE knowledge-edit adapter" in card
    assert "Experts: 1 (rank 16)" in card and "Edits: 2 in 1 batches" in card
    assert "library_name: peft" in card
    assert hub.commits == ["Add 2 edits"]
    assert _reload_matches(model, hub.remote)


def test_the_card_is_a_hugging_face_model_card_with_metadata(model, tmp_path):
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(tmp_path / "model", save_embedding_layers=False)  # no look-up of the base on the Hub
    model.peft_config["default"].save_pretrained(tmp_path / "config")
    for folder in ("model", "config"):
        card = huggingface_hub.ModelCard.load(tmp_path / folder / "README.md")
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert card.data.library_name == "peft" and {"lemoe", "model-editing"} <= set(card.data.tags)
        assert card.text.count("LEMoE knowledge-edit adapter") == 1 and "KeyError: 'LEMOE'" in card.text
    assert "- PEFT " in (tmp_path / "model" / "README.md").read_text(), "PEFT's own card lines are kept"


def test_model_push_to_hub_keeps_the_card_already_on_the_hub(model, hub, monkeypatch):
    lemoe_peft.hub.push_to_hub(model, "user/edits")
    remote_card = lambda cls, repo_id, **kwargs: cls((hub.remote / "README.md").read_text())  # noqa: E731
    monkeypatch.setattr(huggingface_hub.ModelCard, "load", classmethod(remote_card))
    model.push_to_hub("user/edits")  # transformers uploads the Hub's card (tagged), not the one save_pretrained wrote
    card = (hub.remote / "README.md").read_text()
    assert "LEMoE knowledge-edit adapter" in card and "library_name: peft" in card
