"""`quantkit eval` and the eval step of `quantkit run`, through exllamav2 0.3.2's own loader and forward on
the CPU (tests/exl2_cpu): the branches come from its real converter, the reference is the unquantized
model loaded by exllamav2 (or module by module, or transformers). The worker is quantkit's shipped
command (`python -m quantkit.eval.worker`); only its environment carries the stand-in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli
from quantkit.eval import core, metrics, records, text, worker
from quantkit.eval.chart import render_chart

BITS = ("8_0", "6_5", "5_0")


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


# ---- the figures, without exllamav2 ---------------------------------------------------------------------


def test_topk_kl_is_exact_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise(tmp_path):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (12,), generator=g)
    ref, q = torch.randn(12, 50, generator=g) * 3, torch.randn(12, 50, generator=g) * 3
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(q.double(), -1)
    full = (lp.exp() * (lp - lq)).sum(-1)
    for k, folder in ((50, tmp_path / "all"), (5, tmp_path / "top5")):
        metrics.save_reference_row(folder, 0, ids, ref, top_k=k)
        row = metrics.compare_row(metrics.load_reference_row(folder, 0), ids, q)
        if k == 50:
            assert torch.allclose(row["kl"], full, atol=1e-5)
        else:  # grouping outcomes never raises KL (log-sum inequality), and a 5-of-50 head keeps most of it
            assert (row["kl"] <= full + 1e-6).all() and row["kl"].sum() > 0.3 * full.sum()
        same = metrics.compare_row(metrics.load_reference_row(folder, 0), ids, ref)
        assert same["kl"].abs().max() < 1e-6 and same["top1"].mean() == 1.0
        assert torch.allclose(same["nll"], -metrics.load_reference_row(folder, 0)["target_logp"].double(), atol=1e-5)


@pytest.mark.parametrize("kind, needs, free, mode", [
    ("reference", {"full": 10, "layers": 2}, (20, "gpu"), "full"),
    ("reference", {"full": 10, "layers": 2}, (5, "gpu"), "layers"),   # does not fit whole: module by module
    ("reference", {"full": 10, "layers": 8}, (5, "gpu"), "transformers"),  # not even one module: the CPU
    ("branch", {"full": 10, "layers": 8}, (5, "gpu"), "none"),        # a branch never falls back to the CPU
    ("branch", {"full": 10, "layers": 2}, (5, "gpu"), "layers"),
    ("reference", {"full": 1, "layers": 1}, None, "transformers"),    # no CUDA device at all
    ("branch", {"full": 1, "layers": 1}, None, "none"),
])
def test_memory_plan_picks_how_to_load(kind, needs, free, mode):
    assert worker.choose_mode({"kind": kind, "needs": needs}, free)[0] == mode


def test_overlap_is_measured_on_word_ngrams():
    cal = ["the quick brown fox jumps over the lazy dog " * 40]
    assert text.overlap("the quick brown fox jumps over the lazy dog " * 10, cal) == 1.0
    assert text.overlap("a completely different sentence about rivers and cities that never repeats " * 3, cal) == 0.0


def test_chart_is_deterministic_svg():
    import xml.etree.ElementTree as ET

    report = records.EvalReport(text=records.TextInfo(name="t", sha256="ab" * 32, rows=1, length=8, tokens=8, tokenizer_sha256="cd"),
                                exllamav2_version="0.3.2", reference=records.ReferenceInfo(model="m", mode="full", perplexity=10.0), top_k=4, branches={
                                 n: records.BranchEval(branch=n, status="done", bits=b, achieved_bpw=b, bytes=int(b * 1e6),
                                                    perplexity=10 + 1 / b, kl_mean=1 / b**3)
                                 for n, b in (("8_0", 8.0), ("5_0", 5.0))} | {
                                 "4_0": records.BranchEval(branch="4_0", status="failed", error="does not load")})
    svg = render_chart(report)
    assert svg == render_chart(report)
    ET.fromstring(svg)
    assert "8_0" in svg and "5_0" in svg and "4_0" not in svg and "unquantized 10" in svg


# ---- through exllamav2 on the CPU ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_work(tmp_path_factory: pytest.TempPathFactory, tiny_llama_exl2: Path) -> Path:
    """`quantkit run` on the tiny Llama: real converter, eval step on, publishing to a local git repo."""
    import torch

    from exl2_cpu import subprocess_env

    root = tmp_path_factory.mktemp("eval-run")
    recipe = root / "r.toml"
    recipe.write_text("\n".join([
        f'model = "{tiny_llama_exl2}"', 'work = "w"', "rows = 2", "measurement_rows = 2", "length = 64",
        "[eval]", "rows = 4", "length = 128", "top_k = 32",
        "[publish]", 'repo = "alice/tiny-exl2"', 'to = "repo"',
        *[f'[[branches]]\nname = "{b}"\nbits = {b.replace("_", ".")}' for b in BITS]]) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        home = root / "hf"
        mp.setenv("HF_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("HF_TOKEN", raising=False)
        for var in ("QUANTKIT_CONVERTER", "QUANTKIT_CONVERTER_VERSION", core.WORKER_ENV):
            mp.delenv(var, raising=False)
        for key, value in subprocess_env().items():
            mp.setenv(key, value)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr("quantkit.exl2.runtime._said", False)  # the notice is once per process: an earlier test may have had it
        r = invoke("run", recipe)
    assert r.exit_code == 0, r.output
    (root / "run-output.txt").write_text(r.output)
    return root / "w"


def test_run_evaluates_every_branch_and_kl_rises_as_bits_fall(run_work):
    report = json.loads((run_work / "eval.json").read_text())
    assert report["text"]["name"] == "bundled:c4-sample" and report["text"]["tokens"] == 4 * 128
    assert len(report["text"]["sha256"]) == 64 and report["exllamav2_version"] == "0.3.2"
    assert report["reference"]["mode"] == "full" and report["reference"]["perplexity"] > 1
    b = report["branches"]
    assert [b[n]["status"] for n in BITS] == ["done"] * 3
    kl = [b[n]["kl_mean"] for n in BITS]
    top1 = [b[n]["top1_agreement"] for n in BITS]
    assert 0 < kl[0] < kl[1] < kl[2], kl
    assert top1[0] > top1[1] > top1[2], top1
    assert all(b[n]["kl_median"] <= b[n]["kl_p99"] for n in BITS)
    out = (run_work.parent / "run-output.txt").read_text()
    assert "EXLLAMA_NO_SDPA=1" in out and "eval the unquantized model: exllamav2, whole model" in out


def test_main_carries_the_card_columns_and_the_chart(run_work):
    repo = run_work.parent / "repo"
    files = git(repo, "ls-tree", "--name-only", "main").split()
    assert {"eval.json", "eval.svg", "README.md"} <= set(files)
    card = git(repo, "show", "main:README.md")
    header = next(line for line in card.splitlines() if line.startswith("Branch |"))
    assert "| Size | KL | PPL |" in header
    report = json.loads((run_work / "eval.json").read_text())
    for n in BITS:
        row = next(line for line in card.splitlines() if line.startswith(f"{n} |"))
        assert f"| {report['branches'][n]['kl_mean']:.4f} |" in row
    assert "![KL divergence against bits per weight, perplexity against size](https://huggingface.co/alice/tiny-exl2/resolve/main/eval.svg)" in card
    assert git(repo, "show", "main:eval.svg").startswith("<svg")
    assert not [line for line in git(repo, "show", "main:eval.json").splitlines() if str(run_work) in line]


def test_reference_against_itself_is_zero_and_reruns_are_cached(run_work, real_converter, tiny_llama_exl2, monkeypatch):
    p = core.open_work(run_work)
    spec = core.recorded_spec(run_work)
    assert spec is not None and (spec.rows, spec.length, spec.top_k) == (4, 128, 32)
    # A worker killed while computing the reference loses only the rows it had not saved yet.
    (run_work / "eval" / "reference" / "row-00002.safetensors").unlink()
    (run_work / "eval" / "reference.json").unlink()
    rows: list[tuple[str, int]] = []
    with core.for_pipeline(p, spec, on_row=lambda task, row, _n: rows.append((task, row))) as ev:
        self_eval = ev.branches({"unquantized": tiny_llama_exl2}, check=False)["unquantized"]
    assert [r for r in rows if r[0] == core.REFERENCE] == [(core.REFERENCE, 3)]
    assert core.read_report(run_work).reference.perplexity == pytest.approx(ev.reference().perplexity)
    assert self_eval.status == "done" and self_eval.kl_mean < 1e-6 and self_eval.top1_agreement == 1.0
    # Everything is cached now: a worker that cannot start proves that none is needed.
    monkeypatch.setenv(core.WORKER_ENV, f"{sys.executable} -c 'raise SystemExit(9)'")
    r = invoke("eval", run_work, "--format", "json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["branches"]["8_0"] == json.loads((run_work / "eval.json").read_text())["branches"]["8_0"]


def test_reference_module_by_module_matches_the_whole_model(run_work, real_converter, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(run_work, work, ignore=shutil.ignore_patterns("hub-repo", "jobs", "measure"))
    r = invoke("eval", work, "--branch", "8_0", "--reference", "layers", "--format", "json")
    assert r.exit_code == 0, r.output
    layered = json.loads(r.output)
    whole = json.loads((run_work / "eval.json").read_text())
    assert layered["reference"]["mode"] == "layers"
    assert layered["reference"]["perplexity"] == pytest.approx(whole["reference"]["perplexity"], rel=1e-4)
    assert layered["branches"]["8_0"]["kl_mean"] == pytest.approx(whole["branches"]["8_0"]["kl_mean"], rel=1e-3)


def test_a_branch_that_does_not_load_or_gives_nan_is_failed_and_not_published(run_work, real_converter, tmp_path):
    from safetensors.torch import load_file, save_file

    work = tmp_path / "w"
    shutil.copytree(run_work, work, ignore=shutil.ignore_patterns("hub-repo", "jobs", "measure"))
    nan = work / "out" / "9_9"  # a sortable name: a NaN norm in an otherwise sound 8_0
    shutil.copytree(work / "out" / "8_0", nan)
    tensors = load_file(str(nan / "output.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * float("nan")
    save_file(tensors, str(nan / "output.safetensors"), metadata={"format": "pt"})
    broken = work / "out" / "1_0"
    shutil.copytree(work / "out" / "5_0", broken)
    (broken / "output.safetensors").write_bytes((broken / "output.safetensors").read_bytes()[:4096])

    r = invoke("eval", work)
    assert r.exit_code == 0, r.output
    report = core.read_report(work)
    assert report.branches["9_9"].status == "failed" and "non-finite logits" in report.branches["9_9"].error
    assert report.branches["1_0"].status == "failed" and "does not load" in report.branches["1_0"].error
    assert report.branches["8_0"].status == "done"
    assert "1_0: evaluation failed" in r.output and "it will not be published" in r.output
    assert sorted(core.failed_branches(work)) == ["1_0", "9_9"]

    r = invoke("publish", work, "--repo", "alice/tiny-exl2", "--to", tmp_path / "repo")
    assert r.exit_code == 0, r.output
    branches = git(tmp_path / "repo", "branch", "--format=%(refname:short)").split()
    assert "9_9" not in branches and "1_0" not in branches and "8_0" in branches
    card = git(tmp_path / "repo", "show", "main:README.md")
    assert not any(line.startswith(("9_9 |", "1_0 |")) for line in card.splitlines())


def test_a_worker_that_dies_fails_the_branch_in_flight_and_the_rest_go_on(run_work, tmp_path, monkeypatch):
    work = tmp_path / "w"
    shutil.copytree(run_work, work, ignore=shutil.ignore_patterns("hub-repo", "jobs", "measure"))
    shutil.rmtree(work / "eval" / "branches")  # the reference stays cached
    monkeypatch.setenv(core.WORKER_ENV, f"{sys.executable} -c 'import os; os._exit(7)'")
    r = invoke("eval", work, "--format", "json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert [report["branches"][n]["status"] for n in BITS] == ["failed"] * 3
    assert all("exited with status 7" in report["branches"][n]["error"] for n in BITS)


# ---- bad input ---------------------------------------------------------------------------------------------


def test_bad_input_is_one_line(run_work, tmp_path, real_converter):
    work = tmp_path / "w"
    shutil.copytree(run_work, work, ignore=shutil.ignore_patterns("hub-repo", "jobs", "measure"))
    (short := tmp_path / "short.txt").write_text("Only a few words here.\n")
    cal = text.calibration_texts(work / "calibration" / "calibration.parquet")
    (same := tmp_path / "cal.txt").write_text("\n\n".join(cal))
    cases = [
        (["eval", work, "--source", short], "holds", "pass a longer --source"),
        (["eval", work, "--source", same, "--rows", "1", "--length", "64"], "is also in the calibration set", "--allow-overlap"),
        (["eval", work, "--branch", "nope"], "is not a converted EXL2 model (no such folder)", "WORK/out/<branch>"),
        (["eval", tmp_path / "empty"], "no recipe.json", "quantkit run RECIPE"),
    ]
    (tmp_path / "empty").mkdir()
    for args, needle, remedy in cases:
        r = invoke(*args)
        assert r.exit_code == 1, r.output
        line = r.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and needle in line and remedy in line and "Traceback" not in r.output
    # --allow-overlap goes on, with a warning (the worker is stubbed out: only getting past the check counts)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(core.WORKER_ENV, f"{sys.executable} -c 'raise SystemExit(3)'")
        r = invoke("eval", work, "--source", same, "--rows", "1", "--length", "64", "--allow-overlap", "--branch", "8_0")
    assert "warning:" in r.output and "flatter the quants" in r.output
    assert "reference logits could not be computed" in r.output and "exited with status 3" in r.output
