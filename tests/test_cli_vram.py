"""`quantkit vram` and `quantkit archs` through click's CliRunner: exit codes, output, and the error
table message by message (every bad input gets one line, exit 1, no traceback)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import FIXTURES, model_folder
from quantkit.cli.main import cli

LLAMA3 = FIXTURES / "models/llama3-iterative-dpo-8b/config.FALLBACK-derivative-chujiezheng-ExPO.json"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def llama3(tmp_path):
    return str(model_folder(tmp_path, LLAMA3, "llama3"))


def test_json_is_one_row_per_bits_cache_context(llama3):
    r = run("vram", llama3, "--format", "json", "--cache", "fp16,q4", "--context", "4k,8k")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["model"] == "llama3"
    assert len(data["rows"]) == 3 * 2 * 2
    row = data["rows"][0]
    assert set(row) == {"branch", "bits", "head_bits", "cache", "context", "total_bytes", "components", "beyond_native", "weights_from"}
    assert row["total_bytes"] == sum(row["components"].values())
    assert {(r["branch"], r["cache"], r["context"]) for r in data["rows"]} == {
        (b, c, x) for b in ("8_0", "6_5", "5_0") for c in ("fp16", "q4") for x in (4096, 8192)}


def test_json_carries_everything_scripts_need(llama3):
    r = run("vram", llama3, "--format", "json", "--gpu", "12GiB", "--loader", "autosplit", "--no-flash-attn")
    data = json.loads(r.stdout)
    assert data["schema_version"] == 2
    assert data["native_context"] == 8192 and data["architecture"] == "LlamaForCausalLM"
    assert data["weights_from"] == "bits x parameters" and data["embeddings_ram_bytes"] == 128256 * 4096 * 2
    a = data["assumptions"]
    assert (a["loader"], a["flash_attn"], a["paged"], a["chunk_size"], a["generator"]) == ("autosplit", False, False, 2048, "dynamic")
    assert a["cuda_context_bytes"] == 600 * 1024**2
    assert any("beyond llama3's native context" in w for w in data["warnings"])
    assert any("without flash-attn" in w for w in data["warnings"])
    assert {r["beyond_native"] for r in data["rows"] if r["context"] > 8192} == {True}
    assert {r["beyond_native"] for r in data["rows"] if r["context"] <= 8192} == {False}
    fit = data["fit"]
    assert fit["native_context"] == 8192 and fit["headroom_bytes"] == 512 * 1024**2 and fit["sentence"].startswith("Pick: ")
    assert "load_autosplit" in fit["sentence"] and "without flash-attn" in fit["sentence"]


def test_markdown_marks_cells_beyond_native(llama3):
    r = run("vram", llama3, "--format", "markdown", "--context", "8k,16k")
    row = next(line for line in r.stdout.splitlines() if line.startswith("8_0 |"))
    assert row.split(" | ")[3:5] == ["9.6 GiB", "10.6 GiB †"]
    assert "† beyond the model's native context (8192 tokens): it needs RoPE scaling" in r.stdout
    assert "†" not in run("vram", llama3, "--format", "markdown", "--context", "4k,8k").stdout


def test_markdown_is_the_seed_cards_table(llama3):
    r = run("vram", llama3, "--format", "markdown")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("Branch |"))
    assert header == "Branch | Bits | lm_head bits | VRAM (4k) | VRAM (8k) | VRAM (16k) | VRAM (32k) | Description |"
    row = next(line for line in lines if line.startswith("6_5 |"))
    assert row.startswith("6_5 | 6.5 | 8 | ") and row.endswith("good tradeoff of size vs performance, recommended. |")
    assert "FP16 cache" in r.stdout


def test_table_shows_breakdown(llama3):
    r = run("vram", llama3, "--bits", "4.0", "--head-bits", "6")
    assert r.exit_code == 0
    assert "4_0" in r.stdout and "kv_cache" in r.stdout and "system RAM" in r.stdout


def test_gpu_fit_picks_a_branch(llama3):
    r = run("vram", llama3, "--gpu", "10GiB", "--cache", "fp16,q4", "--context", "8k", "--format", "json")
    fit = json.loads(r.stdout)["fit"]
    # 8_0 + FP16 at 8k is ~9.7 GiB by the estimate; the pick is the highest bitrate that holds 8k.
    by = {(x["branch"], x["cache"]): x["max_context"] for x in fit["rows"]}
    assert by[("5_0", "q4")] >= by[("5_0", "fp16")] >= by[("8_0", "fp16")]
    assert fit["pick"]["context"] == 8192
    assert fit["pick"]["bits"] == max(x["bits"] for x in fit["rows"] if x["max_context"] >= 8192)


def test_gpu_too_small(llama3):
    r = run("vram", llama3, "--gpu", "4GiB", "--format", "json")
    fit = json.loads(r.stdout)["fit"]
    assert fit["pick"] is None and all(x["max_context"] == 0 for x in fit["rows"])


def test_context_beyond_model_max_is_a_warning(llama3):
    r = run("vram", llama3, "--context", "16k", "--format", "json")
    assert r.exit_code == 0
    assert "context 16384 is beyond llama3's native context (8192 tokens)" in r.stderr
    assert json.loads(r.stdout)["rows"][0]["beyond_native"] is True


def test_config_only_folder_and_archs():
    r = run("archs")
    assert r.exit_code == 0 and "Qwen3MoeForCausalLM" in r.stdout and "PhiForCausalLM" in r.stdout
    data = json.loads(run("archs", "--json").stdout)
    assert len(data["supported"]) == 28


def _bad_json(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text("{ nope")
    return str(d)


def _corrupt_shard(tmp_path):
    d = model_folder(tmp_path, LLAMA3, "corrupt")
    (d / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json")
    return str(d)


# (argv builder, expected exit code, substring of the one-line error)
BAD_INPUT = [
    (lambda t, m: ["vram", str(t / "nowhere")], 1, "no such folder and not a Hub repo id"),
    (lambda t, m: ["vram", str(t)], 1, "no config.json in"),
    (lambda t, m: ["vram", _bad_json(t)], 1, "not valid JSON"),
    (lambda t, m: ["vram", str(model_folder(t, {"architectures": ["PhiForCausalLM"]}, "phi2"))], 1,
     "architecture PhiForCausalLM is not supported"),
    (lambda t, m: ["vram", m, "--bits", "9.5"], 1, "bits 9.5: exllamav2 targets 2 to 8 bits per weight"),
    (lambda t, m: ["vram", m, "--bits", "six"], 1, "bits six: not a number"),
    (lambda t, m: ["vram", m, "--head-bits", "7"], 1, "head bits 7 is not an lm_head option"),
    (lambda t, m: ["vram", m, "--context", "0"], 1, "context 0: must be a positive number of tokens"),
    (lambda t, m: ["vram", m, "--context", "-4k"], 1, "context -4k"),
    (lambda t, m: ["vram", m, "--context", "4x"], 1, "context 4x: write a token count"),
    (lambda t, m: ["vram", m, "--cache", "q5"], 1, "unknown cache mode 'q5'"),
    (lambda t, m: ["vram", "meta-llama/Meta-Llama-3-8B"], 1, "the Hugging Face Hub cannot be reached"),
    (lambda t, m: ["vram", _corrupt_shard(t)], 1, "header cannot be parsed"),
    (lambda t, m: ["vram", m, "--gpu", "lots"], 1, "GPU size 'lots' does not parse"),
    (lambda t, m: ["vram", m, "--format", "yaml"], 2, "Invalid value for '--format'"),
    (lambda t, m: ["vram", m, "--gpu", "12GiB", "--headroom", "lots"], 1, "headroom 'lots' does not parse; write it like 1GiB"),
    (lambda t, m: ["vram", m, "--gpu", "8GiB", "--headroom", "8GiB"], 1, "headroom '8GiB' is not smaller than the 8GiB card"),
    (lambda t, m: ["vram", m, "--gpu", "8GiB", "--headroom", "-1GiB"], 1, "headroom '-1GiB' does not parse"),
    (lambda t, m: ["vram", m, "--loader", "exllama"], 1, "unknown loader 'exllama': use one of tabby, autosplit"),
    (lambda t, m: ["vram", m, "--context", "1000000000000"], 1, "is beyond 10,000,000 tokens"),
]


@pytest.mark.parametrize("argv, code, message", BAD_INPUT, ids=[m for _, _, m in BAD_INPUT])
def test_bad_input_is_one_line(tmp_path, llama3, argv, code, message):
    r = run(*argv(tmp_path, llama3))
    assert r.exit_code == code, r.output
    assert message in r.stderr
    assert "Traceback" not in r.output
    if code == 1:
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and r.stdout == ""


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_DEBUG", "1")
    r = run("vram", str(tmp_path))
    assert r.exit_code != 0 and r.exception is not None and type(r.exception).__name__ == "ConfigMissing"
