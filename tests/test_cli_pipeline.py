"""The measure/convert/run/calibration commands: one-line errors, no tracebacks, nothing deleted.

The converter here is the double (tests/double/convert_exl2.py): these tests are about the CLI's edge and
each needs a converter run in a few hundred milliseconds; tests/test_real_converter.py runs exllamav2's
own converter through the same pipeline."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantkit.cli.main import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def recipe(tmp_path, model, **extra):
    lines = [f'model = "{model}"', 'work = "w"', "rows = 2", "measurement_rows = 2", "length = 64",
             '[[branches]]', 'name = "6_5"', "bits = 6.5"] 
    lines[5:5] = [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    (p := tmp_path / "r.toml").write_text("\n".join(lines) + "\n")
    return p


def test_run_end_to_end_then_rerun_is_a_no_op(tmp_path, tiny_llama, converter_double):
    r = invoke("run", recipe(tmp_path, tiny_llama))
    assert r.exit_code == 0, r.output
    assert "6_5:" in r.output and "quantkit's own time" in r.output
    state = (tmp_path / "w" / "state.json").read_text()
    again = invoke("run", recipe(tmp_path, tiny_llama))
    assert again.exit_code == 0
    assert json.loads((tmp_path / "w" / "state.json").read_text())["steps"]["convert:6_5"] == json.loads(state)["steps"]["convert:6_5"]


def test_run_dry_run_runs_nothing(tmp_path, tiny_llama, converter_double):
    r = invoke("run", recipe(tmp_path, tiny_llama), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "convert:6_5" in r.output and "publish:" not in r.output and "no publish table (add [publish]" in r.output
    r = invoke("run", recipe(tmp_path, tiny_llama), "--dry-run", "--to", tmp_path / "exl2")
    assert r.exit_code == 0, r.output
    assert "convert:6_5" in r.output and "publish:6_5" in r.output and not (tmp_path / "exl2").exists()
    assert not (tmp_path / "w" / "measure").exists()


def test_measure_then_convert_commands(tmp_path, tiny_llama, converter_double):
    work = tmp_path / "w"
    r = invoke("measure", tiny_llama, "--work", work, "--rows", 2, "--length", 64)
    assert r.exit_code == 0, r.output
    assert "reachable decoder bitrates" in r.output
    r = invoke("convert", tiny_llama, "--work", work, "--bits", "6.5,5.0", "--rows", 2)
    assert r.exit_code == 0, r.output
    assert (work / "out" / "6_5" / "quantkit.json").is_file() and (work / "out" / "5_0" / "output.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["convert", "{model}", "--work", "{tmp}/none", "--bits", "6.5"], "run `quantkit measure"),
        (["measure", "{model}", "--work", "{tmp}/w", "--rows", "0"], "rows must be a positive"),
        (["measure", "{tmp}/nomodel", "--work", "{tmp}/w"], "no such folder"),
        (["measure", "{model}", "--work", "{tmp}/w", "--calibration", "nosuch"], "no calibration recipe or file"),
        (["convert", "{model}", "--work", "{tmp}/w", "--head-bits", "7"], "head bits 7"),
        (["convert", "{model}", "--work", "{tmp}/w", "--bits", "9"], "bits 9"),
        (["run", "{tmp}/missing.toml"], "no such file"),
    ],
)
def test_bad_input_is_one_line_exit_1(tmp_path, tiny_llama, converter_double, args, needle):
    r = invoke(*[a.format(model=tiny_llama, tmp=tmp_path) for a in args])
    assert r.exit_code == 1, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0 or r.output.count("error:") == 1


def test_measure_refuses_a_model_without_weights_or_tokenizer(tmp_path, tiny_llama, converter_double):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_llama, bare)
    (bare / "model.safetensors").unlink()
    r = invoke("measure", bare, "--work", tmp_path / "w")
    assert r.exit_code == 1 and "looked for *.safetensors" in r.output
    (bare / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
    (bare / "tokenizer.json").unlink()
    r = invoke("measure", bare, "--work", tmp_path / "w2", "--rows", 2, "--length", 64)
    assert r.exit_code == 1 and "tokenizer.json" in r.output


def test_without_exllamav2_measure_says_which_extra(tmp_path, tiny_llama, monkeypatch):
    import quantkit.exl2.converter as conv

    monkeypatch.delenv("QUANTKIT_CONVERTER", raising=False)
    monkeypatch.setattr(conv.importlib.util, "find_spec", lambda name: None)
    r = invoke("measure", tiny_llama, "--work", tmp_path / "w", "--rows", 2, "--length", 64)
    assert r.exit_code == 1 and "`pip install exllamav2==0.3.2`" in r.output


def test_calibration_show_and_build(tmp_path, tiny_llama):
    r = invoke("calibration", "show", "default", "--samples", 1)
    assert r.exit_code == 0 and "sample 1" in r.output
    r = invoke("calibration", "build", "default", "--model", tiny_llama, "--out", tmp_path / "c", "--rows", 2, "--length", 64)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "manifest.json").is_file()
