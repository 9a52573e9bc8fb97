"""Published branches and converted folders: `quantkit vram USER/REPO:BRANCH`, `--revision`, a local
converted folder, and the Hugging Face cache offline. The Hub is a fake behind the one HfApi seam."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx2
import numpy as np
import pytest
from click.testing import CliRunner
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import parse_local_safetensors_file_metadata
from safetensors.numpy import save_file

from conftest import model_folder
from quantkit import hub
from quantkit.cli.main import cli
from quantkit.model import load_model, split_ref
from quantkit.vram import CacheMode, estimate

TINY = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "max_position_embeddings": 4096}


def exl2_folder(root: Path, name: str, bits: float = 6.0, head_bits: int = 6) -> Path:
    """A converted EXL2 folder: config with quantization_config, one shard with q_* tensors."""
    folder = model_folder(root, TINY | {"quantization_config": {"quant_method": "exl2", "bits": bits, "head_bits": head_bits}}, name)
    tensors = {"model.embed_tokens.weight": np.zeros((100, 64), np.float16), "model.norm.weight": np.zeros((64,), np.float16),
               "lm_head.q_weight": np.zeros((24, 100), np.int32)}
    for i in range(2):
        for proj, (rows, cols) in {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 32), "self_attn.v_proj": (64, 32),
                                   "self_attn.o_proj": (64, 64), "mlp.gate_proj": (64, 128), "mlp.up_proj": (64, 128),
                                   "mlp.down_proj": (128, 64)}.items():
            tensors[f"model.layers.{i}.{proj}.q_weight"] = np.zeros((int(rows * bits / 32), cols), np.int32)
            tensors[f"model.layers.{i}.{proj}.q_invperm"] = np.zeros((rows,), np.int32)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.zeros((64,), np.float16)
    save_file(tensors, str(folder / "output.safetensors"))
    return folder


def _http(cls, status: int):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))
    return cls(f"{status}", response=response)


class FakeReadHub:
    """The HfApi methods the planner calls: branches are folders on disk."""

    def __init__(self, repo: str, branches: dict[str, Path | None]):
        self.repo, self.branches, self.calls = repo, branches, []

    def _branch(self, repo_id: str, revision: str | None) -> Path | None:
        if repo_id != self.repo:
            raise _http(RepositoryNotFoundError, 404)
        rev = revision or "main"
        if rev not in self.branches:
            raise _http(RevisionNotFoundError, 404)
        return self.branches[rev]

    def hf_hub_download(self, repo_id, filename, *, revision=None, **kw):
        self.calls.append(("hf_hub_download", repo_id, filename, revision))
        folder = self._branch(repo_id, revision)
        if folder is None or not (folder / filename).is_file():
            raise _http(RemoteEntryNotFoundError, 404)
        return str(folder / filename)

    def get_safetensors_metadata(self, repo_id, *, revision=None, **kw):
        self.calls.append(("get_safetensors_metadata", repo_id, revision))
        folder = self._branch(repo_id, revision)
        return SimpleNamespace(files_metadata={p.name: parse_local_safetensors_file_metadata(p) for p in sorted(folder.glob("*.safetensors"))})

    def list_repo_refs(self, repo_id, **kw):
        return SimpleNamespace(branches=[SimpleNamespace(name=b) for b in self.branches])


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ensure_reachable", lambda repo_id, timeout=3.0: None)
    source = model_folder(tmp_path, TINY, "source")
    api = FakeReadHub("alice/tiny-exl2", {"main": None, "6_0": exl2_folder(tmp_path, "b60", 6.0), "4_0": exl2_folder(tmp_path, "b40", 4.0, 8),
                                          "fp16": source})
    monkeypatch.setattr(hub, "get_hf_api", lambda: api)
    return api


@pytest.mark.parametrize("text, split", [
    ("turboderp/Llama-3-8B-exl2:6.0bpw", ("turboderp/Llama-3-8B-exl2", "6.0bpw")),
    ("turboderp/Llama-3-8B-exl2", ("turboderp/Llama-3-8B-exl2", None)),
    ("C:/models/x", ("C:/models/x", None)),  # a Windows-looking path is not REPO:BRANCH
])
def test_split_ref(text, split):
    assert split_ref(text) == split


def vram(*argv: str):
    return CliRunner().invoke(cli, ["vram", *argv])


def test_published_branch_is_one_row_at_its_real_bits(fake_hub):
    r = vram("alice/tiny-exl2:6_0", "--format", "json", "--context", "4k")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [(x["branch"], x["bits"], x["head_bits"], x["weights_from"]) for x in data["rows"]] == [("6_0", 6.0, 6, "safetensors headers")]
    assert data["revision"] == "6_0" and data["model"] == "alice/tiny-exl2:6_0" and data["source"] == "hub"
    assert ("hf_hub_download", "alice/tiny-exl2", "config.json", "6_0") in fake_hub.calls
    assert ("get_safetensors_metadata", "alice/tiny-exl2", "6_0") in fake_hub.calls
    # the figure is the one the headers give, not bits x parameters
    m = load_model("alice/tiny-exl2:6_0")
    assert data["rows"][0]["total_bytes"] == estimate(m, bits=6.0, head_bits=6, context=4096, cache=CacheMode.FP16).total


def test_revision_option_reads_the_same_branch(fake_hub):
    a = json.loads(vram("alice/tiny-exl2:4_0", "--format", "json").stdout)
    b = json.loads(vram("alice/tiny-exl2", "--revision", "4_0", "--format", "json").stdout)
    assert a["rows"] == b["rows"] and a["rows"][0]["bits"] == 4.0 and a["rows"][0]["head_bits"] == 8


def test_revision_of_a_source_model_is_planned_as_usual(fake_hub):
    data = json.loads(vram("alice/tiny-exl2", "--revision", "fp16", "--format", "json").stdout)
    assert {x["branch"] for x in data["rows"]} == {"8_0", "6_5", "5_0"}


def test_other_bits_of_a_converted_branch_are_bits_x_parameters(fake_hub):
    data = json.loads(vram("alice/tiny-exl2:6_0", "--bits", "6.0,5.0", "--context", "4k", "--format", "json").stdout)
    assert [(x["branch"], x["weights_from"]) for x in data["rows"]] == [("6_0", "safetensors headers"), ("5_0", "bits x parameters")]


@pytest.mark.parametrize("ref, message", [
    ("alice/tiny-exl2:9_0", "alice/tiny-exl2 has no branch '9_0' (branches: 4_0, 6_0, fp16, main): pick one"),
    ("alice/tiny-exl2:main", "alice/tiny-exl2:main is not a converted EXL2 branch (it holds no config.json)"),
    ("alice/tiny-exl2:fp16", "alice/tiny-exl2:fp16 is not a converted EXL2 branch (its config.json has no quantization_config"),
    ("alice/other:6_0", "alice/other: not found on the Hub"),
])
def test_bad_branch_is_one_line(fake_hub, ref, message):
    r = vram(ref)
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert r.stdout == ""


def test_local_converted_folder_is_one_honest_row(tmp_path):
    folder = exl2_folder(tmp_path, "6_0", 6.0)
    data = json.loads(vram(str(folder), "--format", "json", "--context", "4k,8k").stdout)
    assert {(x["branch"], x["bits"], x["weights_from"]) for x in data["rows"]} == {("6_0", 6.0, "safetensors headers")}
    assert data["weights_from"] == "safetensors headers"
    other = json.loads(vram(str(folder), "--bits", "8.0,5.0", "--format", "json", "--context", "4k").stdout)
    assert [x["weights_from"] for x in other["rows"]] == ["bits x parameters"] * 2
    assert other["rows"][0]["total_bytes"] > other["rows"][1]["total_bytes"]  # no longer identical rows


def _cache(home: Path, repo: str, revision: str, files: dict[str, Path]) -> None:
    """The Hugging Face cache layout: refs/<branch> -> commit, snapshots/<commit>/<file>."""
    root = Path(home) / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        (snap / name).write_bytes(src.read_bytes())


def test_offline_reads_the_hf_cache(tmp_path, monkeypatch):
    import os

    from huggingface_hub import constants

    home = Path(os.environ["HF_HOME"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub, "get_hf_api", lambda: pytest.fail("offline: no HfApi call"))
    branch = exl2_folder(tmp_path, "b60", 6.0)
    _cache(home, "alice/tiny-exl2", "6_0", {"config.json": branch / "config.json", "output.safetensors": branch / "output.safetensors"})
    r = vram("alice/tiny-exl2:6_0", "--format", "json", "--context", "4k")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["source"] == "hub cache" and data["rows"][0]["weights_from"] == "safetensors headers"
    # not in the cache: the offline error, one line
    r = vram("alice/not-cached")
    assert r.exit_code == 1 and "the Hugging Face Hub cannot be reached" in r.stderr
