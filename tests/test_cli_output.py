"""Output scripts can rely on: --format on every listing command, nothing cut when stdout is a pipe,
and `| head` is success."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import REPO
from quantkit import archs as table
from quantkit.cli.main import cli


@pytest.mark.parametrize("argv", [["archs"], ["archs", "--format", "table"]])
def test_archs_table_is_not_cut_when_piped(argv):
    r = CliRunner().invoke(cli, argv)  # CliRunner's stdout is not a terminal
    assert r.exit_code == 0
    assert "…" not in r.stdout
    lines = r.stdout.splitlines()
    for a in table.supported():
        assert any(a.name in line for line in lines), a.name
    # every refusal reason whole, on one line
    for x in table.refused():
        assert any(x.reason in line for line in lines), x.name


def test_archs_formats():
    data = json.loads(CliRunner().invoke(cli, ["archs", "--format", "json"]).stdout)
    assert data["schema_version"] == 1 and len(data["supported"]) == 28
    assert json.loads(CliRunner().invoke(cli, ["archs", "--json"]).stdout) == data  # the old flag still works
    md = CliRunner().invoke(cli, ["archs", "--format", "markdown"]).stdout
    assert "architectures[0] | family | norm | mlp | attention | notes |" in md
    assert "| Qwen2ForCausalLM |" not in md and "\nQwen2ForCausalLM | Qwen2 | rmsnorm |" in md


@pytest.mark.parametrize("argv", [["archs"], ["archs", "--format", "markdown"], ["vram", "examples/llama3-8b", "--gpu", "12GiB"]])
def test_head_exits_zero(argv):
    """`quantkit ... | head -1`: the reader closes the pipe after one line; that is not an error."""
    p = subprocess.Popen([sys.executable, "-m", "quantkit", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={"PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert p.stdout.readline()
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err
