"""The architecture adapters through the pipeline: measure/convert/run apply the architecture adapter by themselves.

Tiny StableLM and GPT-NeoX checkpoints (adapters_tiny.py) go through the converter double: the working
copy lands in WORK/adapted and is the converter's -i, the user's folder is never written, the adapter
is recorded in measurement.provenance.json and each quantkit.json, the copy is reused while complete
and rebuilt when not, and a config the adapter refuses fails before any converter call.
The double records every -i it was started with and runs in milliseconds; the adapted models through
exllamav2's real converter and loader are in tests/test_real_converter.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapters_tiny import CASES, build
from quantkit.archs import adapters
from quantkit.archs.adapters import PROVENANCE_FILE
from quantkit.branches import Branch
from quantkit.cli.main import cli
from quantkit.workfolder import BRANCH_PROVENANCE
from quantkit.exl2.converter import log_path
from quantkit.exl2.job import read_job
from quantkit.pipeline import Pipeline, Settings
from quantkit.run import dry_run
from tiny import make_tokenizer

#: case -> (source architecture, target exllamav2 architecture)
TARGETS = {"stablelm": ("StableLmForCausalLM", "OrionForCausalLM"), "gpt-neox": ("GPTNeoXForCausalLM", "Starcoder2ForCausalLM")}


def source(tmp_path: Path, case: str, **change: object) -> Path:
    """The tiny checkpoint with a real tokenizer and chat template (calibration tokenizes with it)."""
    folder = tmp_path / f"src-{case}"
    build(case, folder)
    make_tokenizer(folder)
    if change:
        cfg = json.loads((folder / "config.json").read_text()) | change
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def tree_hash(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content hash and mtime (a write that restores the bytes still shows)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def pipeline(model: Path, work: Path, events: list[str] | None = None, *, force: bool = False, **kw: object) -> Pipeline:
    s = Settings(**({"model": str(model), "rows": 2, "measurement_rows": 2, "length": 64} | kw),
                 branches=[Branch(name="8_0", bits=8.0, head_bits=8)])
    listener = (lambda step, line: events.append(step) if line is None else None) if events is not None else None
    p = Pipeline(s, work, listener=listener)
    p.lock(force=force)
    return p


def converter_inputs(job_dir: Path) -> list[str]:
    """Every `-i` the converter was started with for this job (quantkit's log records each argv)."""
    words = [line.split() for line in log_path(job_dir).read_text().splitlines() if line.startswith("=== ") and " -i " in line]
    return [w[w.index("-i") + 1] for w in words]


@pytest.mark.parametrize("case", sorted(TARGETS))
def test_measure_then_convert_goes_through_the_working_copy(tmp_path, converter_double, case):
    src, work = source(tmp_path, case), tmp_path / "w"
    before = tree_hash(src)
    events: list[str] = []
    p = pipeline(src, work, events)
    prov = p.measure()
    result = p.convert(Branch(name="8_0", bits=8.0, head_bits=8))

    adapted = work / "adapted"
    src_arch, target = TARGETS[case]
    assert events.count("adapt") == 1 and events.index("adapt") < events.index("measure")
    assert json.loads((adapted / "config.json").read_text())["architectures"] == [target]
    for job_dir in (work / "measure", work / "jobs" / "8_0"):
        assert converter_inputs(job_dir) == [str(adapted)]
        assert read_job(job_dir)["in_dir"] == str(adapted)
    # Recorded, in the measurement's provenance and the branch's, the way the card reads it.
    want = {"adapter": case.replace("-", "_"), "source_arch": src_arch, "target_arch": target, "status": "experimental"}
    recorded = json.loads(p.work.provenance.read_text())["adapter"]
    assert prov.adapter is not None and prov.adapter.model_dump() == recorded and {k: recorded[k] for k in want} == want
    assert recorded["experimental"] and "experimental" in recorded["summary"] and target in recorded["summary"]
    branch = json.loads((result.folder / BRANCH_PROVENANCE).read_text())
    assert result.folder == work / "out" / "8_0" and branch["adapter"] == recorded
    assert json.loads((result.folder / "config.json").read_text())["architectures"] == [target]
    # The fingerprint is the user's model's, not the copy's, and the user's folder is untouched.
    assert branch["model_fingerprint"] == prov.model_fingerprint == p.fingerprint
    assert tree_hash(src) == before and not any(src.glob(".*partial"))


def test_the_copy_is_reused_while_complete_and_rebuilt_when_not(tmp_path, converter_double):
    src, work = source(tmp_path, "gpt-neox"), tmp_path / "w"
    pipeline(src, work).measure()
    copy = work / "adapted" / PROVENANCE_FILE
    stamp = copy.stat().st_mtime_ns, copy.stat().st_ino

    # A second measurement (other settings, so the converter really runs again) reuses the copy.
    events: list[str] = []
    pipeline(src, work, events, measurement_rows=3, force=True).measure()
    assert "measure" in events and "adapt" not in events
    assert (copy.stat().st_mtime_ns, copy.stat().st_ino) == stamp

    # A copy that lost a shard is rebuilt, whole, before the converter reads it.
    shard = next((work / "adapted").glob("*.safetensors"))
    shard.unlink()
    events = []
    pipeline(src, work, events, measurement_rows=2, force=True).measure()
    assert events.count("adapt") == 1 and shard.is_file()
    assert json.loads(copy.read_text())["files"][shard.name] == "written"


@pytest.mark.parametrize("case", sorted(TARGETS))
def test_dry_run_lists_the_adapt_step_with_its_disk_need(tmp_path, converter_double, case):
    src, work = source(tmp_path, case), tmp_path / "w"
    p = pipeline(src, work)
    steps = {s.step: s for s in dry_run(p).steps}
    adapt = steps["adapt"]
    assert [s.step for s in dry_run(p).steps][:3] == ["calibration", "adapt", "measure"]
    assert adapt.status == "pending" and TARGETS[case][1] in adapt.note and not (work / "adapted").exists()
    # The need is what the copy then writes (hard links cost nothing on one filesystem).
    made = adapters.prepare(src, tmp_path / "probe")
    assert adapt.needs.disk_bytes == made.written_bytes > 0
    if case == "stablelm":  # only the zero o_proj biases Orion expects are new: one per layer, F32
        assert made.written_bytes == CASES[case]["num_hidden_layers"] * CASES[case]["hidden_size"] * 4


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_says_so_once_and_dry_run_shows_the_step(tmp_path, converter_double):
    src = source(tmp_path, "stablelm")
    (r := tmp_path / "r.toml").write_text(f'model = "{src}"\nwork = "w"\nrows = 2\nmeasurement_rows = 2\nlength = 64\n'
                                          '[[branches]]\nname = "8_0"\nbits = 8.0\n')
    dry = invoke("run", r, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "adapt" in dry.output and not (tmp_path / "w" / "adapted").exists()
    ran = invoke("run", r)
    assert ran.exit_code == 0, ran.output
    lines = [line for line in ran.output.splitlines() if "architecture adapter" in line]
    assert len(lines) == 1 and "stablelm" in lines[0] and "experimental" in lines[0] and "GPU" in lines[0]
    recorded = json.loads((tmp_path / "w" / "out" / "8_0" / "quantkit.json").read_text())["adapter"]
    assert recorded["adapter"] == "stablelm"
    card = invoke("card", tmp_path / "w", "--repo", "alice/tiny-exl2")  # the card reads the measurement's provenance
    assert card.exit_code == 0, card.output
    assert recorded["summary"] in card.output


def test_a_refused_config_fails_before_any_converter_call(tmp_path, converter_double):
    src, work = source(tmp_path, "stablelm", qk_layernorm=True), tmp_path / "w"
    before = tree_hash(src)
    r = invoke("measure", src, "--work", work, "--rows", 2, "--length", 64)
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "qk_layernorm" in lines[0], r.output
    assert "Traceback" not in r.output
    assert not (work / "measure").exists() and not (work / "adapted").exists()
    assert tree_hash(src) == before
