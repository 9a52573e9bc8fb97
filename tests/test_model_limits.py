"""Shapes no model has are refused where the model spec is built (`read_shape`), naming the field, so
every command (vram, card, measure, run) refuses them before planning; contexts beyond 10^7 too."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import FIXTURES, model_folder
from quantkit import archs
from quantkit.cli.main import cli
from quantkit.errors import AdapterRefused, ConfigUnreadable, InvalidContext, InvalidModelShape, MissingConfigKey
from quantkit.model import read_shape
from quantkit.vram import MAX_CONTEXT, check_context

LLAMA3 = json.loads((FIXTURES / "models/llama3-iterative-dpo-8b/config.FALLBACK-derivative-chujiezheng-ExPO.json").read_text())
NEOX = json.loads((FIXTURES / "models/redpajama-3b-chat/config.json").read_text())

# (base config, change, field named, exception)
BAD_SHAPES = [
    (LLAMA3, {"num_hidden_layers": 0}, "layers", InvalidModelShape),            # no decoder at all
    (LLAMA3, {"num_hidden_layers": 10**9}, "layers", InvalidModelShape),        # 10^9 layers
    (LLAMA3, {"num_hidden_layers": -2}, "layers", InvalidModelShape),           # negative
    (LLAMA3, {"hidden_size": 0}, "hidden", InvalidModelShape),
    (LLAMA3, {"hidden_size": 10**7}, "hidden", InvalidModelShape),
    (LLAMA3, {"intermediate_size": 0}, "intermediate", InvalidModelShape),
    (LLAMA3, {"vocab_size": 10**12}, "vocab", InvalidModelShape),               # a 10^12 vocabulary
    (LLAMA3, {"vocab_size": 0}, "vocab", InvalidModelShape),
    (LLAMA3, {"num_attention_heads": 0}, "heads", InvalidModelShape),
    (LLAMA3, {"num_attention_heads": 10**6}, "heads", InvalidModelShape),
    (LLAMA3, {"num_attention_heads": 30}, "heads", InvalidModelShape),          # 4096 / 30: no head_dim given
    (LLAMA3, {"num_key_value_heads": 5}, "kv_heads", InvalidModelShape),        # 32 heads in groups of 5?
    (LLAMA3, {"num_key_value_heads": 64}, "kv_heads", InvalidModelShape),       # more KV heads than heads
    (LLAMA3, {"num_key_value_heads": 0}, "kv_heads", InvalidModelShape),
    (LLAMA3, {"head_dim": 0}, "head_dim", InvalidModelShape),
    (LLAMA3, {"head_dim": 8192}, "head_dim", InvalidModelShape),                # larger than hidden: no heads
    (LLAMA3, {"max_position_embeddings": 10**12}, "max_positions", InvalidModelShape),
    (LLAMA3, {"num_hidden_layers": 1.5}, "layers", ConfigUnreadable),           # not a whole number
    (LLAMA3, {"vocab_size": "big"}, "vocab", ConfigUnreadable),
    (NEOX, {"num_hidden_layers": 0}, "layers", AdapterRefused),                 # the GPT-NeoX adapter refuses first
    (NEOX, {"vocab_size": 10**12}, "vocab", InvalidModelShape),
]


@pytest.mark.parametrize("base, change, field, exc", BAD_SHAPES, ids=[f"{f}={list(c.values())[0]!r}" for _, c, f, _ in BAD_SHAPES])
def test_bad_shape_is_refused_naming_the_field(base, change, field, exc):
    config = base | change
    with pytest.raises(exc) as info:
        r = archs.resolve_model(config)
        read_shape(r.config, r.spec)
    assert field in str(info.value)
    if exc is InvalidModelShape:
        assert info.value.field == field


# Shapes that look odd but are real, and must keep working.
GOOD_SHAPES = [
    (LLAMA3, {"num_attention_heads": 24, "head_dim": 128}),  # head_dim given: heads need not divide hidden
    (LLAMA3, {"num_key_value_heads": 1}),                     # MQA
    (LLAMA3, {"num_key_value_heads": 32}),                    # MHA
    (LLAMA3, {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100}),  # the tests' tiny models
]


@pytest.mark.parametrize("base, change", GOOD_SHAPES)
def test_real_shapes_pass(base, change):
    config = base | change
    r = archs.resolve_model(config)
    assert read_shape(r.config, r.spec).layers >= 1


def test_missing_heads_is_a_missing_key():
    config = {k: v for k, v in LLAMA3.items() if k != "num_attention_heads"}
    with pytest.raises(MissingConfigKey):
        read_shape(config, archs.resolve(config))


@pytest.mark.parametrize("context, ok", [(MAX_CONTEXT, True), (MAX_CONTEXT + 1, False), (10**12, False), (0, False)])
def test_context_limit(context, ok):
    if ok:
        assert check_context(context) == context
    else:
        with pytest.raises(InvalidContext):
            check_context(context)


@pytest.mark.parametrize("change, argv, message", [
    ({"num_hidden_layers": 0}, [], "layers = 0 must be at least 1"),
    ({"vocab_size": 10**12}, [], "vocab = 1000000000000 is beyond 4,194,304"),
    ({"num_key_value_heads": 5}, [], "kv_heads = 5 does not divide the 32 attention heads"),
    ({"num_attention_heads": 30}, [], "heads = 30 does not divide hidden_size 4096"),
    ({}, ["--context", "1000000000000"], "context 1000000000000: is beyond 10,000,000 tokens"),
])
@pytest.mark.parametrize("command", [["vram"], ["card"]])
def test_cli_refuses_in_one_line(tmp_path, change, argv, message, command):
    if command == ["card"] and argv:
        pytest.skip("card has no --context")
    folder = model_folder(tmp_path, LLAMA3 | change)
    r = CliRunner().invoke(cli, [*command, str(folder), *argv])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.output
