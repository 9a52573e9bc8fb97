"""exllamav2 0.3.2's own converter, run for real on the CPU (tests/exl2_cpu), through quantkit's pipeline:
calibration -> measure -> convert 8.0 / 6.5 / 5.0 with an 8-bit head -> finalize -> card -> publish to a
local git target. quantkit's converter command is the shipped one (`python -m exllamav2.conversion...`)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from adapters_tiny import build

from quantkit.branches import Branch
from quantkit.exl2 import finalize as fin
from quantkit.exl2.measurement import load_measurement, reachable_range
from quantkit.pipeline import Pipeline, Settings
from quantkit.run import run_all
from quantkit.publish import BackgroundPublisher, PublishOptions
from tiny import make_tokenizer

BITS = (8.0, 6.5, 5.0)
#: What compile.py writes and copies for the tiny Llama, after finalize: README.md and the source's
#: index are gone (finalize), a new index and quantkit.json are there.
BRANCH_FILES = ["config.json", "generation_config.json", "model.safetensors.index.json", "output.safetensors",
                "quantkit.json", "tokenizer.json", "tokenizer_config.json"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def assert_nothing_local_published(repo: Path, branches: list[str], local: list[Path]) -> None:
    """No published file names a local folder (the model's, the work folder's, or their temp root)."""
    roots = {str(p.resolve()) for p in local} | {str(p.resolve().parent) for p in local}
    for branch in branches:
        for name in git(repo, "ls-tree", "-r", "--name-only", branch).split():
            if name.endswith(".safetensors"):
                continue
            text = git(repo, "show", f"{branch}:{name}")
            assert not [r for r in roots if r in text], f"{branch}:{name} names a local path"


def pipeline(model: Path, work: Path, bits=BITS, listener=None) -> Pipeline:
    s = Settings(model=str(model), rows=2, measurement_rows=2, length=64,
                 branches=[Branch(name=f"{b:.1f}".replace(".", "_"), bits=b, head_bits=8) for b in bits])
    p = Pipeline(s, work, listener=listener)
    p.lock()
    return p


def test_calibration_to_publish_through_the_real_converter(tmp_path, tiny_llama_exl2, real_converter):
    work, repo = tmp_path / "w", tmp_path / "repo"
    p = pipeline(tiny_llama_exl2, work)
    results = run_all(p, BackgroundPublisher(work, PublishOptions(repo="alice/tiny-exl2", to=repo)))

    # The measurement: one entry per decoder module, as measure.py writes them (plus its norm/head nulls).
    raw = json.loads(p.work.measurement.read_text())["measurement"]
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    assert sorted(k for k in raw if raw[k] is not None) == sorted(layers)
    assert all(len(raw[k]) > 10 and {"accuracy", "total_bits"} <= set(raw[k][0]) for k in layers)
    rng = reachable_range(load_measurement(p.work.measurement), p.model)
    assert rng.low < 5.0 and 8.0 < rng.high

    for r, bits in zip(results, BITS, strict=True):
        prov = r.provenance
        # optimize.py fits under the target; the tiny model's few options leave it within 0.15 bpw
        assert rng.low <= prov.achieved_decoder_bpw <= bits + 0.01
        assert prov.achieved_decoder_bpw > bits - 0.15
        assert 8.0 <= prov.achieved_head_bpw < 8.5  # 8-bit head: scales and groups on top
        assert prov.exllamav2_version == "0.3.2"
        assert sorted(x.name for x in r.folder.iterdir()) == BRANCH_FILES
        qc = json.loads((r.folder / "config.json").read_text())["quantization_config"]
        assert qc == {"quant_method": "exl2", "version": "0.3.2", "bits": bits, "head_bits": 8,
                      "calibration": {"rows": 2, "length": 64, "dataset": "calibration.parquet"}}
        index = json.loads((r.folder / fin.INDEX_NAME).read_text())
        with safe_open(r.folder / "output.safetensors", "pt") as f:
            names = sorted(f.keys())
        assert sorted(index["weight_map"]) == names
        assert "lm_head.q_weight" in names and "model.layers.1.mlp.down_proj.q_weight" in names
        # each published branch holds exactly the finalized folder plus the card and .gitattributes
        assert sorted(git(repo, "ls-tree", "-r", "--name-only", r.branch).split()) == sorted(BRANCH_FILES + [".gitattributes", "README.md"])
    assert_nothing_local_published(repo, ["main"] + [r.branch for r in results], [tiny_llama_exl2, work])
    recipe = json.loads(git(repo, "show", "main:recipe.json"))
    assert recipe["settings"]["model"] == tiny_llama_exl2.name
    assert json.loads(git(repo, "show", "main:measurement.provenance.json"))["model_ref"] == tiny_llama_exl2.name
    assert all(r.provenance.source_model == tiny_llama_exl2.name for r in results)
    sizes = [r.provenance.bytes for r in results]
    assert sizes == sorted(sizes, reverse=True)  # more bits, more bytes


#: case -> the exllamav2 architecture its adapter targets (tests/adapters_tiny.py builds the sources)
ADAPTED = {"stablelm": "OrionForCausalLM", "gpt-neox": "Starcoder2ForCausalLM"}


@pytest.mark.parametrize("case", sorted(ADAPTED))
def test_adapted_architectures_convert_through_the_real_converter(tmp_path, real_converter, case):
    src = tmp_path / f"src-{case}"
    build(case, src, vocab_size=320)  # the trained tokenizer's 320 pieces must all be embeddable
    make_tokenizer(src)
    work, repo = tmp_path / "w", tmp_path / "repo"
    p = pipeline(src, work, bits=(8.0,))
    [result] = run_all(p, BackgroundPublisher(work, PublishOptions(repo="alice/tiny-exl2", to=repo)))
    assert json.loads((work / "adapted" / "config.json").read_text())["architectures"] == [ADAPTED[case]]
    assert json.loads((result.folder / "config.json").read_text())["architectures"] == [ADAPTED[case]]
    raw = json.loads(p.work.measurement.read_text())["measurement"]
    assert sorted(k for k in raw if raw[k] is not None) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp"))
    assert 7.7 < result.provenance.achieved_decoder_bpw <= 8.01  # few, coarse options on a 2-layer model
    assert result.provenance.adapter.target_arch == ADAPTED[case]
    # the adapter's record (it names the local source folder) stays in the work folder
    assert "quantkit-adapter.json" not in [x.name for x in result.folder.iterdir()]
    assert_nothing_local_published(repo, ["main", result.branch], [src, work])
