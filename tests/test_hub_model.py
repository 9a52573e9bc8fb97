"""Reading a Hub model through the one HfApi seam: the exact calls, and errors mapped to ours."""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
from huggingface_hub.errors import NotASafetensorsRepoError, RepositoryNotFoundError

from conftest import FIXTURES
from quantkit import hub, model
from quantkit.errors import HubOffline, HubRepoNotFound

LLAMA3 = FIXTURES / "models/llama3-iterative-dpo-8b/config.FALLBACK-derivative-chujiezheng-ExPO.json"


@pytest.fixture
def online(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ensure_reachable", lambda repo_id, timeout=3.0: None)
    cfg_dir = tmp_path / "snap"
    cfg_dir.mkdir()
    (cfg_dir / "config.json").write_text(LLAMA3.read_text())
    api = mock.Mock()
    api.hf_hub_download.return_value = str(cfg_dir / "config.json")
    tensor = SimpleNamespace(dtype="BF16", shape=[128256, 4096], data_offsets=(0, 128256 * 4096 * 2))
    api.get_safetensors_metadata.return_value = SimpleNamespace(
        files_metadata={"model-00001-of-00004.safetensors": SimpleNamespace(tensors={"model.embed_tokens.weight": tensor})})
    monkeypatch.setattr(hub, "get_hf_api", lambda: api)
    return api


def test_hub_model_reads_config_and_headers_only(online):
    m = model.load_model("RLHFlow/LLaMA3-iterative-DPO-final")
    online.hf_hub_download.assert_called_once_with("RLHFlow/LLaMA3-iterative-DPO-final", "config.json", revision=None)
    online.get_safetensors_metadata.assert_called_once_with("RLHFlow/LLaMA3-iterative-DPO-final", revision=None)
    assert m.source == "hub" and m.name == "RLHFlow/LLaMA3-iterative-DPO-final"
    assert m.tensors["model.embed_tokens.weight"].nbytes == 128256 * 4096 * 2
    assert m.shape.vocab == 128256


def test_hub_model_without_safetensors(online):
    online.get_safetensors_metadata.side_effect = NotASafetensorsRepoError("no safetensors")
    assert model.load_model("a/b").tensors == {}


def test_hub_repo_not_found(online):
    online.hf_hub_download.side_effect = RepositoryNotFoundError("404", response=mock.Mock(status_code=404, headers={}))
    with pytest.raises(HubRepoNotFound):
        model.load_model("a/b")


def test_offline_fails_fast_without_retries(monkeypatch):
    # HF_HUB_OFFLINE is set by the autouse fixture: no HfApi call at all.
    monkeypatch.setattr(hub, "get_hf_api", mock.Mock(side_effect=AssertionError("must not be called")))
    with pytest.raises(HubOffline):
        model.load_model("meta-llama/Meta-Llama-3-8B")


def test_unreachable_endpoint_is_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(HubOffline):
        hub.ensure_reachable("a/b", timeout=1.0)
