"""The model card: golden READMEs for the supported seed models, front matter round trip, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from quantkit.card import card_spec, parse_card, render_card
from quantkit.cli.main import cli
from workfolders import FIXTURES, SEED_MODELS, SEEDS, make_work, seed_folder

GOLDEN = FIXTURES / "cards"
UPDATE = os.environ.get("QUANTKIT_UPDATE_GOLDEN") == "1"  # regenerate: QUANTKIT_UPDATE_GOLDEN=1 pytest tests/test_card.py

# The source card each seed folder gets: its license, and a base_model of its own that must NOT be copied.
SOURCE_CARD = "---\nlicense: {license}\nbase_model: some-org/the-sources-own-parent\ntags:\n- source-tag\n---\n# {name}\n\nThe source model's own card.\n"


def _seed(tmp_path: Path, seed: str) -> Path:
    _, _, hub_id, license = SEED_MODELS[seed]
    return seed_folder(tmp_path, seed, card=SOURCE_CARD.format(license=license, name=hub_id.split("/")[1]))


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"differs from {path}; review, then QUANTKIT_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("seed", ["llama3-iterative-dpo-8b", "starling-lm-11b-alpha"])
def test_planned_card_golden(tmp_path: Path, seed: str) -> None:
    hub_id = SEED_MODELS[seed][2]
    spec = card_spec(_seed(tmp_path, seed), repo=f"alice/{hub_id.split('/')[1]}-exl2", base_model=hub_id)
    _golden(f"{seed}.planned.md", render_card(spec))


@pytest.mark.parametrize("seed", ["llama3-iterative-dpo-8b", "starling-lm-11b-alpha"])
def test_converted_card_golden(tmp_path: Path, seed: str) -> None:
    hub_id = SEED_MODELS[seed][2]
    src = _seed(tmp_path, seed)
    work = make_work(tmp_path, source=str(src), model_folder=src, branches=("8_0", "6_5", "5_0"))
    spec = card_spec(work, repo=f"alice/{hub_id.split('/')[1]}-exl2", base_model=hub_id)
    assert spec.converted
    assert spec.sizes == {b: (work / "out" / b / "output.safetensors").stat().st_size for b in ("8_0", "6_5", "5_0")}
    _golden(f"{seed}.converted.md", render_card(spec))


def test_card_follows_the_seed_card(tmp_path: Path) -> None:
    """The llama3 seed exl2 card's sections, prompt block and table layout, in order."""
    seed = "llama3-iterative-dpo-8b"
    text = render_card(card_spec(_seed(tmp_path, seed), repo="alice/x-exl2", base_model=SEED_MODELS[seed][2]))
    reference = (SEEDS / "llama3-iterative-dpo-exl2.card.txt").read_text().splitlines()
    block = reference[reference.index("Prompt format") + 1: reference.index("Available sizes")]
    assert "```\n" + "\n".join(block) + "\n```" in text
    header = reference[reference.index("Available sizes") + 1]
    ours = next(line for line in text.splitlines() if line.startswith("Branch |"))
    assert [c.strip().lower() for c in ours.split("|") if c.strip() and c.strip() != "Size"] == \
           [c.strip().lower() for c in header.split("|") if c.strip()]
    positions = [text.index(s) for s in ("# Exllama v2", 'The "main" branch only contains the measurement.json',
                                         "Original model:", "Calibration dataset:", "## Prompt format", "## Available sizes",
                                         "## Download instructions", "# Original model card")]
    assert positions == sorted(positions)
    for branch in ("8_0", "6_5", "5_0"):
        assert any(line.startswith(f"{branch} | ") for line in text.splitlines())


def test_front_matter_round_trip_and_never_the_sources_base_model(tmp_path: Path) -> None:
    seed = "starling-lm-11b-alpha"
    text = render_card(card_spec(_seed(tmp_path, seed), repo="bob/Starling-exl2", base_model=SEED_MODELS[seed][2]))
    data = ModelCard(text, ignore_metadata_errors=False).data.to_dict()
    assert data == {
        "base_model": "CallComply/Starling-LM-11B-alpha",
        "base_model_relation": "quantized",
        "license": "cc-by-nc-4.0",
        "pipeline_tag": "text-generation",
        "tags": ["exl2", "exllamav2", "quantized", "source-tag"],  # quantkit's, then the source's
        "quantized_by": "bob",
    }
    assert "some-org/the-sources-own-parent" not in text.split("# Original model card")[0]


def test_the_sources_metadata_is_carried(tmp_path: Path) -> None:
    folder = seed_folder(tmp_path, "starling-lm-11b-alpha", card=(
        "---\nlicense: apache-2.0\nlanguage:\n- en\n- fr\ndatasets:\n- acme/chats\npipeline_tag: text-generation\n"
        "tags:\n- chat\n- exl2\nbase_model: acme/parent\n---\n# m\n"))
    data = ModelCard(render_card(card_spec(folder, base_model="acme/m"))).data.to_dict()
    assert data["base_model"] == "acme/m" and data["base_model_relation"] == "quantized"
    assert (data["license"], data["language"], data["datasets"]) == ("apache-2.0", ["en", "fr"], ["acme/chats"])
    assert data["tags"] == ["exl2", "exllamav2", "quantized", "chat"]


def test_a_source_card_whose_front_matter_does_not_parse_is_a_warning(tmp_path: Path) -> None:
    folder = seed_folder(tmp_path, "starling-lm-11b-alpha", card="---\nlicense: [unclosed\ntags: {\n---\n# The body\n\nkept.\n")
    spec = card_spec(folder, base_model="acme/m")
    assert spec.license is None and spec.source_tags == []
    assert any("front matter does not parse" in n for n in spec.notes)
    text = render_card(spec)
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == "acme/m" and "license" not in data
    assert "# The body\n\nkept." in text and "unclosed" not in text
    result = CliRunner().invoke(cli, ["card", str(folder), "--base-model", "acme/m"])
    assert result.exit_code == 0 and "front matter does not parse" in result.stderr


def test_base_model_from_the_hub_cache_path_and_from_config(tmp_path: Path) -> None:
    rev = "0123456789abcdef0123456789abcdef01234567"
    cached = seed_folder(tmp_path / "hub" / "models--CallComply--Starling-LM-11B-alpha" / "snapshots", "starling-lm-11b-alpha")
    cached = cached.rename(cached.parent / rev)
    spec = card_spec(cached)
    assert spec.base_model == "CallComply/Starling-LM-11B-alpha"
    assert any("Hugging Face cache" in n for n in spec.notes)
    folder = seed_folder(tmp_path, "starling-lm-11b-alpha")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(cfg | {"_name_or_path": "CallComply/Starling-LM-11B-alpha"}))
    assert card_spec(folder).base_model == "CallComply/Starling-LM-11B-alpha"
    (folder / "config.json").write_text(json.dumps(cfg | {"_name_or_path": "/home/me/models/starling"}))
    assert card_spec(folder).base_model is None


def test_an_invalid_base_model_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["card", str(make_work(tmp_path)), "--base-model", "not a/valid--id"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "is not valid" in result.stderr and "--base-model" in result.stderr


def test_license_other_carries_name_and_link(tmp_path: Path) -> None:
    folder = seed_folder(tmp_path, "starling-lm-11b-alpha",
                         card="---\nlicense: other\nlicense_name: acme\nlicense_link: https://acme.example/LICENSE\n---\nbody\n")
    data = ModelCard(render_card(card_spec(folder, base_model="acme/m"))).data.to_dict()
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "acme", "https://acme.example/LICENSE")


def test_unknown_prompt_format_is_said_in_the_card(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    for tc in (work / "out").glob("*/tokenizer_config.json"):
        tc.write_text('{"eos_token": "</s>"}')
    spec = card_spec(work)
    assert spec.prompt.name == "unknown"
    assert "Unknown: the source model has no chat template" in render_card(spec)
    assert any("--prompt-format" in n for n in spec.notes)


@pytest.mark.parametrize("seed, target", [("rocket-3b", "OrionForCausalLM"), ("stablelm-zephyr-3b", "OrionForCausalLM"),
                                          ("redpajama-3b-chat", "Starcoder2ForCausalLM")])
def test_adapted_architectures_get_a_card_that_says_so(tmp_path: Path, seed: str, target: str) -> None:
    # StableLM and GPT-NeoX go through the architecture adapters: the card names the adapter and that it is
    # experimental until proven on a GPU.
    spec = card_spec(_seed(tmp_path, seed))
    assert spec.adapter is not None and target in spec.adapter and "experimental" in spec.adapter
    text = render_card(spec)
    assert "mapped onto one it does" in text and "experimental" in text
    parse_card(text)


def test_cli_writes_card_and_says_notes(tmp_path: Path) -> None:
    work = make_work(tmp_path)
    out = tmp_path / "README.md"
    result = CliRunner().invoke(cli, ["card", str(work), "--repo", "alice/tiny-exl2", "--output", str(out), "--cache", "q4"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "VRAM with Q4 cache (ExLlamaV2Cache_Q4)" in text
    assert "hf download alice/tiny-exl2 --revision 6_5" in text
    assert "recognised chatml" in result.stderr


def test_cli_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["card", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
