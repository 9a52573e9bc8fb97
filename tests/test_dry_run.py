"""Planning reads nothing heavy: constructing the pipeline and `quantkit run --dry-run` work on a folder
holding only config.json and on a Hub id without downloading weights, and say what a real run needs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from click.testing import CliRunner

from quantkit import hub
from quantkit.cli.main import cli
from quantkit.errors import NoWeights
from quantkit.pipeline import Pipeline, Settings
from quantkit.run import dry_run


def _recipe(tmp_path: Path, model: str) -> Path:
    (r := tmp_path / "r.toml").write_text(f'model = "{model}"\nwork = "w"\nrows = 2\nmeasurement_rows = 2\nlength = 64\n'
                                          '[[branches]]\nname = "6_5"\nbits = 6.5\n')
    return r


@pytest.fixture
def config_only(tmp_path: Path, tiny_llama: Path) -> Path:
    folder = tmp_path / "config-only"
    folder.mkdir()
    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def hub_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama: Path) -> mock.Mock:
    """tiny-llama on a fake Hub: config.json and safetensors headers through the HfApi seam."""
    monkeypatch.setattr(hub, "ensure_reachable", lambda repo_id, timeout=3.0: None)
    snap = tmp_path / "snap"
    snap.mkdir()
    shutil.copy(tiny_llama / "config.json", snap / "config.json")
    api = mock.Mock()
    api.hf_hub_download.return_value = str(snap / "config.json")
    from quantkit.model import read_local_tensors

    tensors = {n: SimpleNamespace(dtype=t.dtype, shape=list(t.shape), data_offsets=(0, t.nbytes))
               for n, t in read_local_tensors(tiny_llama).items()}
    api.get_safetensors_metadata.return_value = SimpleNamespace(files_metadata={"model.safetensors": SimpleNamespace(tensors=tensors)})
    api.snapshot_download.return_value = str(tiny_llama)
    monkeypatch.setattr(hub, "get_hf_api", lambda: api)
    return api


def test_config_only_folder_plans_and_says_the_weights_are_missing(tmp_path: Path, config_only: Path) -> None:
    r = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, str(config_only))), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "convert:6_5" in r.output and "a real run needs" in r.output
    assert "holds no *.safetensors" in " ".join(r.output.split())  # the table may wrap the line
    assert not (tmp_path / "w").exists()  # planning writes nothing


def test_config_only_folder_refuses_at_the_first_real_step(tmp_path: Path, config_only: Path) -> None:
    p = Pipeline(Settings(model=str(config_only)), tmp_path / "w")  # constructing reads headers only
    with pytest.raises(NoWeights):
        p.lock()


def test_hub_id_plans_without_downloading_weights(tmp_path: Path, hub_model: mock.Mock) -> None:
    r = CliRunner().invoke(cli, ["run", str(_recipe(tmp_path, "alice/tiny-llama")), "--dry-run"])
    assert r.exit_code == 0, r.output
    hub_model.snapshot_download.assert_not_called()
    text = " ".join(r.output.split())
    assert "convert:6_5" in text and "downloaded from the Hub (alice/tiny-llama)" in text and "NVIDIA GPU" in text and "quantkit-exl2[exl2]" in text


def test_hub_id_downloads_when_a_step_needs_the_weights(tmp_path: Path, hub_model: mock.Mock, tiny_llama: Path) -> None:
    p = Pipeline(Settings(model="alice/tiny-llama"), tmp_path / "w")
    hub_model.snapshot_download.assert_not_called()
    d = dry_run(p)
    assert any("downloaded from the Hub" in n for n in d.needs) and d.reachable is None
    hub_model.snapshot_download.assert_not_called()
    p.lock()
    hub_model.snapshot_download.assert_called_once()
    assert hub_model.snapshot_download.call_args.args == ("alice/tiny-llama",)
    recorded = json.loads(p.work.settings.read_text())
    assert recorded["model_dir"] == str(tiny_llama) and recorded["settings"]["model"] == "alice/tiny-llama"
