"""The CPU half of the GPU proof: scripts/gpu/vram_report.py and measure_vram.py's GPU-free parts.

Every Measurement below is a FABRICATED TEST INPUT (made-up byte counts), not a GPU reading; nothing
here writes to benchmarks/. The EXL2 folders are fabricated too: zero-filled tensors with the names,
dtypes and sizes exllamav2's compiler writes for a 4-bit, group-128 quantization.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import REPO, load_gpu_script
from quantkit.model import load_model
from quantkit.vram import CacheMode, estimate, qparams_total_bits

pytest.importorskip("tokenizers")  # make_models.py builds the source model's tokenizer.json
mm = load_gpu_script("make_models")
mv = load_gpu_script("measure_vram")
vr = mv.vr  # the module measure_vram.py itself imported, so its classes are the ones compared
GiB = 1024**3
SCRIPTS = REPO / "scripts" / "gpu"

#: FABRICATED TEST INPUT: made-up readings in the shape measure_vram.py produces on a GPU.
FAKE = vr.Measurement(
    model="test-model", branch="8_0", bits=8.0, head_bits=8, cache="fp16", context=4096,
    load_peak_allocated=900 * 1024**2, gen_peak_allocated=700 * 1024**2, peak_reserved=1000 * 1024**2,
    cuda_context=500 * 1024**2, allocated_before=0, device_used_after=1600 * 1024**2, loader="autosplit",
    attention="torch SDPA (unpaged; test input)", prompt_tokens=2048, new_tokens=8,
)


def exl2_folder(src: Path, dst: Path, *, bits: float, head_bits: int, group: int = 128) -> Path:
    """A fabricated EXL2 branch of `src`: every linear as 4-bit q_weight + scales + groups + invperm, the
    rest fp16, and exllamav2's quantization_config (target bits, not achieved) in config.json."""
    m = load_model(src)
    tensors: dict[str, np.ndarray] = {}
    for name, t in m.tensors.items():
        if name.endswith("proj.weight") or name == "lm_head.weight":
            out_f, in_f = t.shape
            key, groups = name[: -len(".weight")], -(-in_f // group)
            tensors[key + ".q_weight"] = np.zeros((in_f * 4 // 32, out_f), np.int32)
            tensors[key + ".q_scale"] = np.zeros((groups, out_f * 4 // 32), np.int32)
            tensors[key + ".q_scale_max"] = np.zeros((groups,), np.float16)
            tensors[key + ".q_groups"] = np.zeros((2 * groups,), np.int16)
            tensors[key + ".q_invperm"] = np.zeros((in_f,), np.int32)
        else:
            tensors[name] = np.zeros(t.shape, np.float16)
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "output.safetensors"))
    cfg = dict(m.config, quantization_config={"quant_method": "exl2", "version": "0.3.2", "bits": bits,
                                              "head_bits": head_bits, "calibration": {"rows": 16, "length": 512}})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("proof")
    s = replace(mm.LLAMA3, layers=1, hidden=512, vocab=256 + 704)  # a multiple of 8: whole int32 scale words
    src = mm.write_model(s, root / "src")
    w = root / "work"
    exl2_folder(src, w / "out" / "8_0", bits=8.0, head_bits=8)
    exl2_folder(src, w / "out" / "5_0", bits=5.0, head_bits=6)
    (w / "out" / "notes").mkdir()
    (w / "out" / "notes" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return src, w


def test_discover_branches_reads_exllamav2s_quantization_config(work) -> None:
    _, w = work
    found = vr.discover_branches("m", w)
    assert [(b.branch, b.bits, b.head_bits) for b in found] == [("8_0", 8.0, 8), ("5_0", 5.0, 6)]
    assert all(b.path == w / "out" / b.branch for b in found)


def test_achieved_bpw_counts_every_exl2_tensor_like_qparams(work) -> None:
    src, w = work
    rec = mv.branch_record(vr.discover_branches("m", w)[0], src)
    shapes = {n: t.shape for n, t in load_model(src).tensors.items()}
    linears = [s for n, s in shapes.items() if n.endswith("proj.weight")]
    # exllamav2's QParams.total_bits (as quantkit.vram re-implements it) for 4-bit group-128, over numel.
    want = sum(qparams_total_bits(i, o, 128, (4,), (1.0,)) for o, i in linears) / sum(o * i for o, i in linears)
    assert rec["decoder_bpw"] == pytest.approx(want)
    assert 4.0 < rec["decoder_bpw"] < 4.5
    o, i = shapes["lm_head.weight"]
    assert rec["head_bpw"] == pytest.approx(qparams_total_bits(i, o, 128, (4,), (1.0,)) / (o * i))
    assert rec["bpw_ok"] is False  # 4.2 achieved against the folder's 8.0 target: flagged
    assert "output.safetensors" in rec["files"]


def test_achieved_bpw_refuses_a_linear_missing_from_the_conversion() -> None:
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj"):
        vr.achieved_bpw({"model.layers.0.mlp.down_proj.q_weight": 64}, {
            "model.layers.0.mlp.down_proj.weight": (8, 16), "model.layers.0.mlp.up_proj.weight": (16, 8)})


@pytest.mark.parametrize("target,achieved,ok", [
    (8.0, 8.03, True),   # the dearest option is ~8.04: normal
    (6.5, 6.38, True),
    (5.0, 4.84, False),  # 0.16 short: flagged
    (5.0, 5.2, False),
])
def test_bpw_tolerance(target: float, achieved: float, ok: bool) -> None:
    assert vr.bpw_ok(target, achieved) is ok


def test_the_quantkit_vram_call_matches_the_estimator(work) -> None:
    """The exact subprocess measure_vram.py runs, parsed, equals quantkit.vram.estimate for the folder."""
    _, w = work
    b = vr.discover_branches("m", w)[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    got = vr.run_quantkit_vram(b.path, bits=b.bits, head_bits=b.head_bits, contexts=[4096, 32768], caches=["fp16", "q4"], env=env)
    model = load_model(b.path)
    assert model.is_exl2
    want = {(c, n): estimate(model, bits=5.0, head_bits=6, context=n, cache=CacheMode(c)).total
            for c in ("fp16", "q4") for n in (4096, 32768)}
    assert got == want


def test_the_estimate_assumes_the_measured_loader(work) -> None:
    """measure_vram.py loads with --loader and compares with `quantkit vram --loader` of the same name, and
    with --no-flash-attn when the machine has no flash-attn."""
    from quantkit.vram import Loader

    _, w = work
    b = vr.discover_branches("m", w)[1]
    argv = vr.quantkit_vram_argv(b.path, bits=b.bits, head_bits=b.head_bits, contexts=[4096], caches=["fp16"], loader="autosplit", flash_attn=False)
    assert argv[argv.index("--loader") + 1] == "autosplit" and "--no-flash-attn" in argv
    env = dict(os.environ, PYTHONPATH=str(REPO))
    got = vr.run_quantkit_vram(b.path, bits=b.bits, head_bits=b.head_bits, contexts=[4096], caches=["fp16"],
                               loader="autosplit", flash_attn=False, env=env)
    model = load_model(b.path)
    assert got == {("fp16", 4096): estimate(model, bits=5.0, head_bits=6, context=4096, cache=CacheMode.FP16,
                                            loader=Loader.AUTOSPLIT, flash_attn=False).total}


def test_a_failing_quantkit_vram_call_says_which(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with pytest.raises(RuntimeError, match="vram"):
        vr.run_quantkit_vram(tmp_path, bits=8.0, head_bits=8, contexts=[4096], caches=["fp16"], env=env)


def test_measured_bytes_is_the_larger_peak_plus_the_context() -> None:
    assert FAKE.measured_bytes == 900 * 1024**2 + 500 * 1024**2
    assert replace(FAKE, gen_peak_allocated=1200 * 1024**2).measured_bytes == 1700 * 1024**2


@pytest.mark.parametrize("diff_gib,meets", [
    (0.0, True),
    (0.25, True),     # the band's edge counts as inside
    (0.26, False),    # over-estimate beyond the band
    (-0.1, True),     # under by exactly the allowance
    (-0.11, False),   # under by more than 0.1 GiB, though inside the band
    (-0.3, False),
])
def test_verdict_is_the_issues_goal(diff_gib: float, meets: bool) -> None:
    measured = 3 * GiB
    v = vr.verdict(measured, measured + int(diff_gib * GiB))
    assert v["meets_goal"] is meets
    assert v["diff_gib"] == pytest.approx(diff_gib, abs=1e-3)


def test_report_files(tmp_path: Path) -> None:
    stages = tmp_path / "stages.tsv"
    stages.write_text("install\t4.2\tok\nbuild_extension\t181.5\tok\npipeline_x\t0\tskipped (90 s left)\n")
    r = vr.Report(command="bash scripts/gpu/prove.sh", date="test-date", device={"name": "TEST GPU"},
                  versions={"exllamav2": "0.3.2"}, stages=vr.read_stages(stages))
    r.add(FAKE, FAKE.measured_bytes + int(0.05 * GiB))
    r.add(replace(FAKE, cache="q4", context=32768), FAKE.measured_bytes - int(0.2 * GiB))
    r.branches.append({"model": "test-model", "branch": "8_0", "bits": 8.0, "head_bits": 8,
                       "decoder_bpw": 8.02, "head_bpw": 8.03, "bpw_ok": True})
    r.generations.append({"model": "test-model", "branch": "8_0", "text": " fox fox"})
    r.skipped.append({"model": "test-model", "branch": "8_0", "cache": "q6", "context": 4096})
    out = tmp_path / "out"
    assert [p.name for p in r.write(out)] == ["vram.json", "results.json", "summary.md"]

    rows = json.loads((out / "vram.json").read_text())
    assert [tuple(row) for row in rows] == [vr.VRAM_KEYS] * 2
    assert rows[1]["cache"] == "q4" and rows[1]["context"] == 32768
    assert rows[0]["estimated_bytes"] - rows[0]["measured_bytes"] == int(0.05 * GiB)
    assert "load_autosplit" in rows[0]["how_measured"] and "mem_get_info" in rows[0]["how_measured"]

    res = json.loads((out / "results.json").read_text())
    assert res["build_seconds"] == 181.5
    assert res["cells_meeting_goal"] == 1
    assert [c["meets_goal"] for c in res["cells"]] == [True, False]
    assert res["stages"][2] == {"stage": "pipeline_x", "seconds": 0.0, "status": "skipped (90 s left)"}

    md = (out / "summary.md").read_text()
    assert "`bash scripts/gpu/prove.sh`" in md and "TEST GPU" in md
    assert "1 of 2 cells meet the goal" in md
    assert "| test-model | 8 | q4 | 32768 |" in md and "MISSED" in md
    assert "Skipped 1 cells" in md


def test_measure_vram_help_needs_no_gpu() -> None:
    """The script imports torch and exllamav2 only inside its functions."""
    done = subprocess.run([sys.executable, str(SCRIPTS / "measure_vram.py"), "--help"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), check=False)
    assert done.returncode == 0, done.stderr
    assert "--case" in done.stdout and "--report-only" in done.stdout


@pytest.mark.parametrize("script", ["prove.sh", "fetch_wheels.sh"])
def test_shell_scripts_parse(script: str) -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_prove_installs_with_the_device_readmes_line() -> None:
    # /work/.library/device/README.md: the one install line that the device documents for carried wheels.
    line = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
            ".whl/*.whl && export PYTHONPATH=/tmp/site || exit")
    assert line in (SCRIPTS / "prove.sh").read_text()
