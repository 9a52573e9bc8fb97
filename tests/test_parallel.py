"""Branches converted side by side on one machine (`--gpus`): GPU discovery without torch, the slot
plan from RAM, one converter process per GPU (shown by the GPU each converter saw and by the overlap
of their runs, from the double's own start/end lines, not by timing), publishing as each finishes,
and a failure that lets the others finish and resumes on the rerun."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.branches import Branch
from quantkit.cli.main import cli
from quantkit.errors import ConverterFailed, NoSuchGpu
from quantkit.publish.git_target import GitTarget
from quantkit.parallel import choose_gpus, pinned, plan_slots, visible_gpus
from quantkit.pipeline import Pipeline, Settings
from quantkit.run import run_all
from quantkit.publish import BackgroundPublisher, PublishOptions

BITS = (8.0, 6.5, 5.0)
_START = re.compile(r"\(double\) start ([\d.]+) CUDA_VISIBLE_DEVICES=(\S*)")
_END = re.compile(r"\(double\) end ([\d.]+)")


def runs(job_dir: Path) -> list[tuple[float, float | None, str]]:
    """(start, end or None, CUDA_VISIBLE_DEVICES) of every converter run in a job folder's log."""
    out: list[tuple[float, float | None, str]] = []
    for line in (job_dir / "quantkit-converter.log").read_text().splitlines():
        if m := _START.search(line):
            out.append((float(m.group(1)), None, m.group(2)))
        elif (m := _END.search(line)) and out:
            out[-1] = (out[-1][0], float(m.group(1)), out[-1][2])
    return out


def pipeline(model: Path, work: Path, *, gpus: list[str] | None = None) -> Pipeline:
    s = Settings(model=str(model), rows=2, measurement_rows=2, length=64,
                 branches=[Branch(name=f"{b:g}", bits=b, head_bits=8) for b in BITS])
    p = Pipeline(s, work, converter=pinned(gpus[0]) if gpus else None)
    p.lock()
    return p


def state(work: Path) -> dict:
    return json.loads((work / "state.json").read_text())


# ---- which GPUs --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "gpus"), [
    ("0,1,2", ["0", "1", "2"]),
    (" 2, 3 ", ["2", "3"]),
    ("GPU-1a2b,GPU-3c4d", ["GPU-1a2b", "GPU-3c4d"]),  # UUIDs are valid entries too
    ("1,-1,2", ["1"]),  # CUDA stops at the first invalid entry: "-1" hides what follows
    ("", []),  # set but empty: no GPU at all
])
def test_cuda_visible_devices_decides_when_set(value, gpus):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": value}) == gpus


def test_nvidia_smi_lists_the_gpus_otherwise(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert visible_gpus({}) == ["0", "1"]
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert visible_gpus({}) == []  # no nvidia-smi: no GPU, and no torch imported to find out


@pytest.mark.parametrize(("option", "visible", "chosen"), [
    (None, ["0"], []),  # one GPU: one conversion after another, as before
    (None, ["0", "1", "2"], ["0", "1", "2"]),  # several: all of them by default
    ("all", ["0", "1"], ["0", "1"]),
    ("2,0", ["0", "1", "2"], ["2", "0"]),
    ("1,1", ["0", "1"], ["1"]),
])
def test_choose_gpus(option, visible, chosen):
    assert choose_gpus(option, visible) == chosen


@pytest.mark.parametrize(("option", "visible"), [("3", ["0", "1"]), ("0,7", ["0", "1"]), ("all", []), (",", ["0"])])
def test_a_gpu_that_does_not_exist_is_refused(option, visible):
    with pytest.raises(NoSuchGpu):
        choose_gpus(option, visible)


def test_the_ram_plan_caps_conversions_at_once(tmp_path, tiny_llama):
    p = pipeline(tiny_llama, tmp_path / "w")
    gpus = ["0", "1", "2"]
    each = plan_slots(p, p.settings.branches, gpus).ram_each
    assert each > 0
    assert plan_slots(p, p.settings.branches, gpus, ram_available=None).at_once == 3
    assert plan_slots(p, p.settings.branches, gpus, ram_available=10 * each).at_once == 3
    assert plan_slots(p, p.settings.branches, gpus, ram_available=2 * each + 1).at_once == 2
    assert plan_slots(p, p.settings.branches, gpus, ram_available=each // 2).at_once == 1  # never fewer than one


@pytest.mark.parametrize("command", ["run", "convert"])
def test_cli_refuses_a_missing_gpu_before_anything_starts(tmp_path, tiny_llama, converter_double, monkeypatch, command):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    work = tmp_path / "w"
    if command == "run":
        (tmp_path / "r.toml").write_text(f'model = "{tiny_llama}"\nwork = "w"\nrows = 2\nmeasurement_rows = 2\nlength = 64\n')
        args = ["run", str(tmp_path / "r.toml"), "--gpus", "0,5"]
    else:
        args = ["convert", str(tiny_llama), "--work", str(work), "--gpus", "0,5"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and "GPU 5" in r.output and "visible: 0, 1" in r.output and "--gpus" in r.output
    assert not work.exists()  # nothing started


# ---- conversions side by side ------------------------------------------------------------------------

def test_three_branches_convert_at_once_one_per_gpu_and_publish_as_they_finish(tmp_path, tiny_llama, converter_double, monkeypatch):
    monkeypatch.setenv("QK_DOUBLE_BARRIER", f"{tmp_path / 'barrier'}:3")  # each conversion waits until all three are alive
    work, repo = tmp_path / "w", tmp_path / "repo"
    gpus = ["0", "1", "2"]
    p = pipeline(tiny_llama, work, gpus=gpus)
    results = run_all(p, BackgroundPublisher(work, PublishOptions(to=repo)), slots=plan_slots(p, p.settings.branches, gpus))
    assert [r.branch for r in results] == ["8", "6.5", "5"]
    assert runs(work / "measure")[0][2] == "0"  # the measurement on the first chosen GPU
    conv = [runs(work / "jobs" / r.branch)[0] for r in results]
    assert sorted(c[2] for c in conv) == gpus  # one GPU each
    assert max(c[0] for c in conv) < min(c[1] for c in conv)  # all three converters were alive together
    assert all("barrier passed" in (work / "jobs" / r.branch / "quantkit-converter.log").read_text() for r in results)
    target = GitTarget(repo).id
    s = state(work)
    for b in ("8", "6.5", "5"):
        assert s["steps"][f"convert:{b}"]["status"] == "done"
        assert s["published"][b][target]["verified"] is True
    assert subprocess.run(["git", "-C", str(repo), "rev-parse", "6.5"], capture_output=True).returncode == 0


def test_with_ram_for_one_the_conversions_take_turns(tmp_path, tiny_llama, converter_double, monkeypatch):
    work = tmp_path / "w"
    gpus = ["0", "1", "2"]
    p = pipeline(tiny_llama, work, gpus=gpus)
    plan = plan_slots(p, p.settings.branches, gpus, ram_available=plan_slots(p, p.settings.branches, gpus).ram_each)
    assert plan.at_once == 1
    results = run_all(p, slots=plan)
    conv = sorted(runs(work / "jobs" / r.branch)[0] for r in results)
    assert all(a[1] <= b[0] for a, b in zip(conv, conv[1:]))  # never two at once


def test_a_failed_branch_lets_the_others_finish_and_the_rerun_redoes_only_it(tmp_path, tiny_llama, converter_double, monkeypatch):
    monkeypatch.setenv("QK_DOUBLE_JOB_SECONDS", "0.5")
    monkeypatch.setenv("QK_DOUBLE_FAIL_AT", "quant:2")  # the first converter to get there dies mid-quantization
    monkeypatch.setenv("QK_DOUBLE_FAIL_MODE", "kill")
    monkeypatch.setenv("QK_DOUBLE_FAIL_ONCE", str(tmp_path / "fired"))
    work = tmp_path / "w"
    gpus = ["0", "1", "2"]
    p = pipeline(tiny_llama, work, gpus=gpus)
    with pytest.raises(ConverterFailed):
        run_all(p, slots=plan_slots(p, p.settings.branches, gpus))
    steps = state(work)["steps"]
    failed = [b for b in ("8", "6.5", "5") if steps[f"convert:{b}"]["status"] == "failed"]
    assert len(failed) == 1
    assert all(steps[f"convert:{b}"]["status"] == "done" for b in ("8", "6.5", "5") if b not in failed)
    done_logs = {b: (work / "jobs" / b / "quantkit-converter.log").read_text() for b in ("8", "6.5", "5")}

    p = pipeline(tiny_llama, work, gpus=gpus)
    run_all(p, slots=plan_slots(p, p.settings.branches, gpus))
    assert all(state(work)["steps"][f"convert:{b}"]["status"] == "done" for b in ("8", "6.5", "5"))
    for b, log in done_logs.items():
        again = (work / "jobs" / b / "quantkit-converter.log").read_text()
        if b in failed:
            assert "Resuming job" in again[len(log):]  # resumed mid-quantization, not started over
        else:
            assert again == log  # finished branches: no converter ran again



def test_the_run_command_converts_on_the_visible_gpus(tmp_path, tiny_llama, converter_double, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")  # no --gpus: all visible GPUs, as there are several
    monkeypatch.setenv("QK_DOUBLE_BARRIER", f"{tmp_path / 'barrier'}:3")
    text = "\n".join([f'model = "{tiny_llama}"', 'work = "w"', "rows = 2", "measurement_rows = 2", "length = 64",
                      *(f'[[branches]]\nname = "{b:g}"\nbits = {b}' for b in BITS), "[publish]", 'to = "repo"'])
    (tmp_path / "r.toml").write_text(text + "\n")
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "r.toml")])
    assert r.exit_code == 0, r.output
    assert "converting up to 3 branch(es) at once on GPU(s) 0, 1, 2" in r.output
    work = tmp_path / "w"
    assert sorted(runs(work / "jobs" / f"{b:g}")[0][2] for b in BITS) == ["0", "1", "2"]
    assert all("barrier passed" in (work / "jobs" / f"{b:g}" / "quantkit-converter.log").read_text() for b in BITS)
    assert "quantkit's own time" in r.output
