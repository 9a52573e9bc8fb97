"""The file-backed pipeline against the converter double: resume after a kill at every stage,
refusals before any GPU work, locked settings, cleaned outputs.

Why the double and not exllamav2's converter (tests/test_real_converter.py runs that end to end, with a
kill during measure and during a conversion): a kill at an exact job stage or mid-shard, an exit 0 without
a finished job, and a converter that dies after its job file says "finished" are faults that cannot be
injected around the real converter (it has no hook, and its stages are hit only by timing); the
refusals and locked settings need a converter run per test, in milliseconds."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from quantkit.branches import Branch
from quantkit.errors import (
    ConverterFailed,
    MeasurementCorrupt,
    MeasurementMismatch,
    SettingsLocked,
    UnreachableBits,
    WorkFolderMismatch,
)
from quantkit.exl2 import finalize as fin
from quantkit.exl2.measurement import load_measurement, reachable_range
from quantkit.pipeline import Pipeline, Settings
from quantkit.publish import PublishOptions
from quantkit.run import dry_run, run_all
from tiny import make_tiny_llama


def settings(model, bits=(6.5,), **kw):
    return Settings(**({"model": str(model), "rows": 2, "measurement_rows": 2, "length": 64} | kw),
                    branches=[Branch(name=f"{b:g}".replace(".", "_"), bits=b, head_bits=8) for b in bits])


def pipeline(model, work, events=None, **kw):
    listener = (lambda step, line: events.append((step, line.status.stage if line and line.status else None))) if events is not None else None
    p = Pipeline(settings(model, **kw), work, listener=listener)
    p.lock()
    return p


def test_full_run_cleans_each_branch(tmp_path, tiny_llama, converter_double):
    p = pipeline(tiny_llama, tmp_path / "w", bits=(8.0, 5.0))
    results = run_all(p)
    assert [r.branch for r in results] == ["8", "5"]
    for r in results:
        files = sorted(x.name for x in r.folder.iterdir())
        assert "README.md" not in files and "quantkit.json" in files
        index = json.loads((r.folder / fin.INDEX_NAME).read_text())
        with safe_open(r.folder / "output.safetensors", "np") as f:
            assert sorted(index["weight_map"]) == sorted(f.keys())  # the index names the real shards now
        assert set(index["weight_map"].values()) == {"output.safetensors"}
        assert json.loads((r.folder / "config.json").read_text())["quantization_config"]["quant_method"] == "exl2"
    # More bits, more bytes: the double sizes tensors by the optimizer's choice.
    assert results[0].provenance.bytes > results[1].provenance.bytes
    full = json.loads((tmp_path / "w" / "state.json").read_text())
    state = full["steps"]
    assert not full["published"]  # without a publisher, run_all converts only (tests/test_run_publish.py publishes)
    assert all(state[s]["status"] == "done" for s in ("calibration", "measure", "convert:8", "convert:5"))


@pytest.mark.parametrize(
    "fail_at",
    ["begin", "initial_embeddings", "measure_quant", "measure_quant:3",  # measurement job
     "optimize", "tokens_cal", "embeddings", "quant", "quant:1", "compile", "compile:shards"],  # conversion job
)
def test_resume_after_a_kill_at_every_stage(tmp_path, tiny_llama, converter_double, monkeypatch, fail_at):
    work = tmp_path / "w"
    if fail_at not in ("begin", "initial_embeddings", "measure_quant", "measure_quant:3"):
        pipeline(tiny_llama, work).measure()  # the measurement is done; the kill hits the conversion
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", fail_at)
    monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", "kill")
    with pytest.raises(ConverterFailed) as info:
        run_all(pipeline(tiny_llama, work))
    assert info.value.exit_code == -9
    monkeypatch.delenv("QK_DOUBLE_FAIL_AT")
    events: list = []
    run_all(pipeline(tiny_llama, work, events=events))
    stages = [s for _, s in events if s]
    if fail_at in ("quant", "quant:1", "compile", "compile:shards"):
        assert "Optimizing" not in stages  # resumed past the finished stages of exllamav2's job
    if fail_at == "measure_quant:3":
        assert "Tokenizing (1)" not in stages
    assert json.loads((work / "state.json").read_text())["steps"]["convert:6_5"]["status"] == "done"
    assert (work / "out" / "6_5" / "quantkit.json").is_file()


def test_a_crash_between_the_converter_and_the_bookkeeping_resumes(tmp_path, tiny_llama, converter_double, monkeypatch):
    work = tmp_path / "w"
    boom = RuntimeError("killed after the converter finished")
    monkeypatch.setattr(fin, "finalize", lambda *a, **k: (_ for _ in ()).throw(boom))
    with pytest.raises(RuntimeError):
        run_all(pipeline(tiny_llama, work))
    monkeypatch.undo()  # also drops the fixture's converter variable: set it again
    monkeypatch.setenv("QUANTKIT_CONVERTER", f"python {converter_double}")
    events: list = []
    run_all(pipeline(tiny_llama, work, events=events))
    assert not [s for _, s in events if s]  # nothing ran again: exllamav2 would say "already finished"
    assert (work / "out" / "6_5" / "quantkit.json").is_file()


def test_exit_zero_failure_is_a_failure(tmp_path, tiny_llama, converter_double, monkeypatch):
    p = pipeline(tiny_llama, tmp_path / "w")
    p.measure()
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "quant")
    monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", "exit0")
    with pytest.raises(ConverterFailed) as info:
        p.convert(p.settings.branches[0])
    assert info.value.exit_code == 0 and info.value.stage == "Embeddings"
    assert json.loads((tmp_path / "w" / "state.json").read_text())["steps"]["convert:6_5"]["status"] == "failed"


def test_unreachable_bitrates_are_refused_before_any_conversion(tmp_path, tiny_llama, converter_double):
    p = pipeline(tiny_llama, tmp_path / "w", bits=(6.5, 2.0))
    p.measure()
    rng = reachable_range(load_measurement(p.work.measurement), p.model)
    assert 2.0 < rng.low < 6.5 < 8.0 < rng.high  # the tiny shapes' fixed costs push the floor above 2.0
    with pytest.raises(UnreachableBits) as info:
        run_all(p)
    assert info.value.low == rng.low
    assert not (tmp_path / "w" / "jobs").exists()  # refused before the first conversion started


def test_reachable_range_matches_the_double_optimizer(tmp_path, tiny_llama, converter_double):
    """Just above the floor converts; the achieved decoder bpw stays within the measurement's range."""
    p = pipeline(tiny_llama, tmp_path / "w")
    p.measure()
    rng = reachable_range(load_measurement(p.work.measurement), p.model)
    low = round(rng.low + 0.01, 2)
    r = p.convert(Branch(name="low", bits=low, head_bits=8))
    assert rng.low - 0.2 <= r.provenance.achieved_decoder_bpw <= low


def test_measurement_of_another_model_is_refused(tmp_path, tiny_llama, converter_double):
    pipeline(tiny_llama, tmp_path / "w").measure()
    other = make_tiny_llama(tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(WorkFolderMismatch):
        pipeline(other, tmp_path / "w")
    # Copying the measurement into another model's work folder does not pass either.
    p2 = pipeline(other, tmp_path / "w2")
    for name in ("measurement.json", "measurement.provenance.json"):
        (tmp_path / "w2" / name).write_bytes((tmp_path / "w" / name).read_bytes())
    with pytest.raises(MeasurementMismatch):
        p2.check_branches(p2.settings.branches)


def test_corrupt_or_edited_measurement_is_refused(tmp_path, tiny_llama, converter_double):
    p = pipeline(tiny_llama, tmp_path / "w")
    p.measure()
    data = json.loads(p.work.measurement.read_text())
    data["measurement"]["model.layers.0.mlp"][0]["total_bits"] = 1
    p.work.measurement.write_text(json.dumps(data))
    with pytest.raises(MeasurementMismatch):  # its sha256 no longer matches the provenance
        p.analysis()
    p.work.measurement.write_text("{")
    with pytest.raises((MeasurementCorrupt, MeasurementMismatch)):
        p.analysis()
    with pytest.raises(MeasurementCorrupt):
        load_measurement(p.work.measurement)


def test_settings_that_invalidate_finished_work_are_locked(tmp_path, tiny_llama, converter_double):
    work = tmp_path / "w"
    run_all(pipeline(tiny_llama, work))
    with pytest.raises(SettingsLocked):
        Pipeline(settings(tiny_llama, measurement_rows=3), work).lock()
    with pytest.raises(SettingsLocked):
        Pipeline(settings(tiny_llama).model_copy(update={"branches": [Branch(name="6_5", bits=6.0)]}), work).lock()
    Pipeline(settings(tiny_llama, bits=(5.0,)), work).lock()  # a new branch invalidates nothing
    forced = Pipeline(settings(tiny_llama).model_copy(update={"branches": [Branch(name="6_5", bits=6.0)]}), work)
    forced.lock(force=True)
    assert not (work / "jobs" / "6_5").exists() and forced.state.get("convert:6_5").status == "pending"
    assert forced.state.done("measure")


def test_dry_run_lists_steps_with_needs_and_reachable_bits(tmp_path, tiny_llama, converter_double):
    p = pipeline(tiny_llama, tmp_path / "w", bits=(8.0, 2.0))
    d = dry_run(p)
    assert [s.step for s in d.steps] == ["calibration", "measure", "convert:8", "convert:2"]
    assert d.publish_target.startswith("nowhere")
    d = dry_run(p, PublishOptions(to=tmp_path / "repo"))
    assert [s.step for s in d.steps] == ["calibration", "measure", "convert:8", "convert:2", "publish:8", "publish:main", "publish:2"]
    assert d.publish_target == f"git:{(tmp_path / 'repo').resolve()}" and not (tmp_path / "repo").exists()
    assert d.reachable is None
    assert all(s.needs.disk_bytes > 0 and s.needs.vram_bytes > 0 for s in d.steps if s.step.startswith(("measure", "convert")))
    p.measure()
    d = dry_run(p)
    assert d.reachable is not None and d.unreachable == ["2"]
