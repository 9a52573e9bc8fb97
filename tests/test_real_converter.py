"""exllamav2 0.3.2's own converter, run for real on the CPU (tests/exl2_cpu), through quantkit's pipeline:
calibration -> measure -> convert 8.0 / 6.5 / 5.0 with an 8-bit head -> finalize -> card -> publish to a
local git target. quantkit's converter command is the shipped one (`python -m exllamav2.conversion...`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open

from adapters_tiny import build
from exl2_cpu import exllamav2_logits, on_cpu
from quantkit.branches import Branch
from quantkit.errors import ConverterFailed
from quantkit.exl2 import converter as conv
from quantkit.exl2 import finalize as fin
from quantkit.exl2 import runtime
from quantkit.exl2.job import read_job
from quantkit.exl2.measurement import load_measurement, reachable_range
from quantkit.pipeline import Pipeline, Settings
from quantkit.publish import BackgroundPublisher, PublishOptions
from quantkit.run import run_all
from test_exl2_cpu import cosine, reference_logits, token_ids
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


def test_calibration_to_publish_through_the_real_converter(tmp_path, tiny_llama_exl2, real_converter, monkeypatch):
    work, repo = tmp_path / "w", tmp_path / "repo"
    lines = []
    p = pipeline(tiny_llama_exl2, work, listener=lambda step, line: line is not None and lines.append(line))
    results = run_all(p, BackgroundPublisher(work, PublishOptions(repo="alice/tiny-exl2", to=repo)))

    # exllamav2's " ## Warning: ..." lines are warnings (no error line at all in a clean run), and quantkit
    # leaves -o empty for a new job: no "Output directory is not empty".
    assert [x.text for x in lines if x.kind == "error"] == []
    assert any(x.kind == "warning" and x.text.startswith("## Warning") for x in lines)
    assert not [x.text for x in lines if "Output directory is not empty" in x.text]

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
    # named by its Hub id, here from config.json's _name_or_path (quantkit.source.identify)
    recipe = json.loads(git(repo, "show", "main:recipe.json"))
    assert recipe["settings"]["model"] == "tiny/llama" and recipe["source"] == {"hub_id": "tiny/llama"}
    assert json.loads(git(repo, "show", "main:measurement.provenance.json"))["model_ref"] == "tiny/llama"
    assert all(r.provenance.source_model == "tiny/llama" for r in results)
    sizes = [r.provenance.bytes for r in results]
    assert sizes == sorted(sizes, reverse=True)  # more bits, more bytes

    # Each branch loaded by exllamav2's own loader, against transformers' logits of the source model.
    ids = token_ids(tiny_llama_exl2)
    ref = reference_logits(tiny_llama_exl2, ids)
    for key, value in runtime.exllamav2_env().items():
        monkeypatch.setenv(key, value)
    with on_cpu():
        cos = [cosine(ref, exllamav2_logits(r.folder, ids)) for r in results]
    assert cos[0] > 0.999 and cos[-1] > 0.95 and cos == sorted(cos, reverse=True), cos  # 8.0 > 6.5 > 5.0


#: case -> the exllamav2 architecture its adapter targets (tests/adapters_tiny.py builds the sources)
ADAPTED = {"stablelm": "OrionForCausalLM", "gpt-neox": "Starcoder2ForCausalLM"}


@pytest.mark.parametrize("case", sorted(ADAPTED))
def test_adapted_architectures_convert_through_the_real_converter(tmp_path, real_converter, monkeypatch, case):
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

    # exllamav2's loader on the working copy and on the 8.0 branch, against transformers on the original
    ids = list(range(1, 40))
    ref = reference_logits(src, ids)
    for key, value in runtime.exllamav2_env().items():
        monkeypatch.setenv(key, value)
    with on_cpu():
        assert cosine(ref, exllamav2_logits(work / "adapted", ids)[:, :320]) > 0.9999
        assert cosine(ref, exllamav2_logits(result.folder, ids)[:, :320]) > 0.99


def test_resume_after_a_kill_during_measure_and_during_a_conversion(tmp_path, tiny_llama_exl2, real_converter):
    """kill -9 of the real converter mid-stage, then the same run again. exllamav2 checkpoints every 180 s
    and after the last module (measure.py:697, quantize.py:520), so on a tiny model the killed stage
    restarts from its first module, while the stages its job file records as done are not redone."""
    work = tmp_path / "w"
    events: list[tuple[str, str, float]] = []
    kill_at = {"measure": "Measuring", "convert:5_0": "Quantizing"}

    def listener(step, line):
        if line is None or line.status is None:
            return
        events.append((step, line.status.stage, line.status.completion))
        if kill_at.get(step) == line.status.stage and line.status.completion > 0:
            del kill_at[step]
            job_dir = work / "measure" if step == "measure" else work / "jobs" / "5_0"
            os.killpg(json.loads(conv.pid_path(job_dir).read_text())["pid"], signal.SIGKILL)

    with pytest.raises(ConverterFailed) as info:
        run_all(pipeline(tiny_llama_exl2, work, bits=(5.0,), listener=listener))
    assert info.value.exit_code == -9 and info.value.stage == "Measuring"
    assert read_job(work / "measure")["progress"] == "measure_quant"
    events.clear()
    with pytest.raises(ConverterFailed) as info:
        run_all(pipeline(tiny_llama_exl2, work, bits=(5.0,), listener=listener))
    assert info.value.stage == "Quantizing"
    measured = [e for e in events if e[0] == "measure"]
    assert measured[0][1:] == ("Measuring", 0.0)  # past tokenizing and embeddings, from the first module
    assert read_job(work / "jobs" / "5_0")["progress"] == "quant"
    events.clear()
    [result] = run_all(pipeline(tiny_llama_exl2, work, bits=(5.0,), listener=listener))
    assert [e[0] for e in events if e[0] == "measure"] == []  # finished: not run again
    converted = [e[1:] for e in events if e[0] == "convert:5_0"]
    assert converted[0] == ("Quantizing", 0.0) and "Optimizing" not in [s for s, _ in converted]
    assert 4.8 < result.provenance.achieved_decoder_bpw <= 5.01
