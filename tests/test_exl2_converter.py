"""The converter seam against the test double: argv, verdicts from job_new.json, failures, resume.

The double, because the faults are injected into the converter itself (exit 0 or 1 at a given stage, a
converter that hangs and must be sent SIGTERM): none can be injected around exllamav2's own."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quantkit.errors import ConverterCancelled, ConverterFailed, ConverterMissing, JobMismatch
from quantkit.exl2 import converter as conv
from quantkit.exl2 import runtime
from quantkit.exl2.converter import ConvertJob, Converter, MeasureJob, build_argv
from quantkit.exl2.job import read_job
from quantkit.exl2.status import MEASURE_STAGES
from tiny import TEXT


def parquet(path: Path, n: int = 200) -> Path:
    pq.write_table(pa.table({"text": [TEXT] * n}), path)
    return path


def measure_job(tmp: Path, model: Path) -> MeasureJob:
    return MeasureJob(model_dir=model, work_dir=tmp / "measure", measurement=tmp / "measurement.json",
                      calibration=parquet(tmp / "cal.parquet"), rows=4, length=64)


def convert_job(tmp: Path, model: Path, bits: float = 6.5) -> ConvertJob:
    return ConvertJob(model_dir=model, work_dir=tmp / "jobs" / "6_5", measurement=tmp / "measurement.json",
                      output_dir=tmp / "cf" / "6_5", bits=bits, head_bits=8, calibration=tmp / "cal.parquet", rows=4, length=64)


def test_argv_is_exllamav2s_exactly(tmp_path):
    m = MeasureJob(model_dir=Path("/m"), work_dir=Path("/w/measure"), measurement=Path("/w/measurement.json"),
                   calibration=Path("/w/calibration/calibration.parquet"), rows=16, length=2048)
    assert build_argv(m) == ["-i", "/m", "-o", "/w/measure", "-om", "/w/measurement.json",
                             "-c", "/w/calibration/calibration.parquet", "-mr", "16", "-ml", "2048", "-so"]
    c = ConvertJob(model_dir=Path("/m"), work_dir=Path("/w/jobs/8_0"), measurement=Path("/w/measurement.json"),
                   output_dir=Path("/w/cf/8_0"), bits=8, head_bits=8, calibration=Path("/w/c.parquet"), rows=100, length=2048)
    assert build_argv(c) == ["-i", "/m", "-o", "/w/jobs/8_0", "-m", "/w/measurement.json", "-b", "8.0", "-hb", "8",
                             "-cf", "/w/cf/8_0", "-c", "/w/c.parquet", "-r", "100", "-l", "2048", "-so"]
    assert "-nr" not in build_argv(m) + build_argv(c)


def test_default_command_is_the_installed_module(monkeypatch):
    monkeypatch.delenv(conv.CONVERTER_ENV, raising=False)
    assert conv.converter_command() == [sys.executable, "-m", "exllamav2.conversion.convert_exl2"]
    monkeypatch.setenv(conv.CONVERTER_ENV, "/opt/py -m my.conv")
    assert conv.converter_command() == ["/opt/py", "-m", "my.conv"]


def test_preflight_without_exllamav2_names_the_extra(monkeypatch):
    monkeypatch.delenv(conv.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConverterMissing):
        conv.preflight()


def test_measure_then_convert_with_status_events(tmp_path, tiny_llama, converter_double):
    events = []
    m = measure_job(tmp_path, tiny_llama)
    res = Converter().run(m, on_line=lambda line: line.status and events.append(line.status.stage))
    assert not res.skipped and res.exit_code == 0
    assert list(dict.fromkeys(events)) == list(MEASURE_STAGES)
    data = json.loads(m.measurement.read_text())
    assert len(data["measurement"]["model.layers.0.self_attn"]) == 19
    assert len(data["measurement"]["model.layers.1.mlp"]) == 17
    assert "-so" in conv.log_path(m.work_dir).read_text()
    c = convert_job(tmp_path, tiny_llama)
    Converter().run(c)
    assert (c.output_dir / "output.safetensors").is_file()
    assert json.loads((c.output_dir / "config.json").read_text())["quantization_config"]["bits"] == 6.5
    # A second run of a finished job launches nothing (exllamav2 would exit 0 with "already finished").
    assert Converter().run(c).skipped


@pytest.mark.parametrize(
    ("fail_at", "mode", "code"),
    [
        ("begin", "exit0", 0),  # bare sys.exit() after a " ## " line: exit status 0, still a failure
        ("measure_quant:2", "exit1", 1),  # os._exit(1) mid-stage
        ("measure_quant", "kill", -9),  # the OOM killer
    ],
)
def test_failures_are_detected_whatever_the_exit_code(tmp_path, tiny_llama, converter_double, monkeypatch, fail_at, mode, code):
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", fail_at)
    monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", mode)
    m = measure_job(tmp_path, tiny_llama)
    with pytest.raises(ConverterFailed) as info:
        Converter().run(m)
    assert info.value.exit_code == code
    assert (m.work_dir / "job_new.json").exists()  # kept for resume
    if mode != "kill":
        assert info.value.last_error.startswith("## Measurement/inference error")
    monkeypatch.delenv("QK_DOUBLE_FAIL_AT")
    Converter().run(m)  # the rerun resumes and finishes
    assert read_job(m.work_dir)["progress"] == "finished"


def test_resume_mid_measurement_keeps_measured_layers(tmp_path, tiny_llama, converter_double, monkeypatch):
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "measure_quant:2")
    m = measure_job(tmp_path, tiny_llama)
    with pytest.raises(ConverterFailed):
        Converter().run(m)
    assert read_job(m.work_dir)["last_module_idx"] == 2
    monkeypatch.delenv("QK_DOUBLE_FAIL_AT")
    events = []
    Converter().run(m, on_line=lambda line: line.status and events.append((line.status.stage, line.status.completion)))
    measuring = [c for s, c in events if s == "Measuring"]
    assert measuring[0] > 0  # resumed at module 2, not from the start
    assert ("Tokenizing (1)", 0.0) not in events


def test_cancel_sends_sigterm_to_a_hung_converter(tmp_path, tiny_llama, converter_double, monkeypatch):
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "measure_quant")
    monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", "hang")
    m = measure_job(tmp_path, tiny_llama)
    c = Converter()
    seen = threading.Event()

    def on_line(line):
        if "hanging" in line.text:
            seen.set()

    t = threading.Thread(target=lambda: seen.wait(30) and c.cancel())
    t.start()
    with pytest.raises(ConverterCancelled) as info:
        c.run(m, on_line=on_line)
    t.join()
    assert info.value.stage == "Embeddings"  # the last status line before the hang
    assert "=== exit -15" in conv.log_path(m.work_dir).read_text()


def test_a_kept_job_with_other_settings_is_refused(tmp_path, tiny_llama, converter_double, monkeypatch):
    m = measure_job(tmp_path, tiny_llama)
    Converter().run(m)
    c = convert_job(tmp_path, tiny_llama, bits=6.5)
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "quant")
    with pytest.raises(ConverterFailed):
        Converter().run(c)
    with pytest.raises(JobMismatch) as info:
        Converter().run(convert_job(tmp_path, tiny_llama, bits=5.0))
    assert (info.value.field, info.value.found, info.value.wanted) == ("bits", 6.5, 5.0)


@pytest.mark.parametrize(("arch", "context", "saved"), [
    ("GPT2LMHeadModel", {"n_positions": 32}, 32),  # no RoPE: convert_exl2.py:211-218 saves the model's context
    ("GPTBigCodeForCausalLM", {"n_positions": 48}, 48),
    ("GPT2LMHeadModel", {"n_positions": 1024}, 64),  # longer context: the length stays
    ("LlamaForCausalLM", {"max_position_embeddings": 32}, 64),  # RoPE: exllamav2 never shortens it
])
def test_resume_expects_the_length_exllamav2_saved(tmp_path, arch, context, saved):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": [arch]} | context))
    job = measure_job(tmp_path, model)  # length 64
    job.work_dir.mkdir()
    # the job file as convert_exl2.py saved it before a kill
    (job.work_dir / "job_new.json").write_text(json.dumps({
        "in_dir": str(model), "cal_dataset": str(job.calibration), "measurement_rows": 4, "measurement_length": saved,
        "length": min(2048, saved), "output_measurement": str(job.measurement), "progress": "measure_quant"}))
    conv.check_resumable(job)  # no JobMismatch
    other = job.model_copy(update={"length": 96})
    if saved < 64:  # a longer request is shortened to the same context: still this job
        conv.check_resumable(other)
    else:
        with pytest.raises(JobMismatch):
            conv.check_resumable(other)


@pytest.mark.parametrize("installed", [None, "flash_attn", "xformers"])
def test_every_converter_runs_with_no_sdpa_unless_a_causal_attention_is_installed(tmp_path, monkeypatch, installed):
    """exllamav2's SDPA attention is not causal (quantkit/exl2/runtime.py): without flash-attn or xformers
    the converter's environment carries EXLLAMA_NO_SDPA=1, and the screen hears it once per process."""
    real = runtime.importlib.util.find_spec
    monkeypatch.setattr(runtime.importlib.util, "find_spec",
                        lambda name, *a: (object() if name == installed else None) if name in ("flash_attn", "xformers") else real(name, *a))
    monkeypatch.setattr(runtime, "_said", False)
    monkeypatch.delenv(runtime.NO_SDPA, raising=False)
    probe = Converter(command=[sys.executable, "-c", "import os; print('NO_SDPA=' + os.environ.get('EXLLAMA_NO_SDPA', 'unset'))"])
    lines = []
    for _ in range(2):
        with pytest.raises(ConverterFailed):  # the probe writes no job: only its environment matters here
            probe.run(measure_job(tmp_path, tmp_path), on_line=lines.append)
    texts = [line.text for line in lines if line.kind == "text"]
    warnings = [line.text for line in lines if line.kind == "warning"]
    if installed is None:
        assert texts.count("NO_SDPA=1") == 2 and warnings == [runtime.NO_SDPA_NOTICE]
    else:
        assert texts.count("NO_SDPA=unset") == 2 and warnings == []
