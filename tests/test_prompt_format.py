"""The prompt format of each seed model comes out as its card documents it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit.errors import UnknownPromptFormat
from quantkit.prompt_format import KNOWN_FORMATS, parse_override, prompt_format, render_chat_template
from workfolders import SEEDS, seed_folder

LLAMA3_CARD_BLOCK = (
    "<|start_header_id|>system<|end_header_id|>\n{system_prompt}<|eot_id|>\n"
    "<|start_header_id|>user<|end_header_id|>\n{prompt}<|eot_id|>\n"
    "<|start_header_id|>assistant<|end_header_id|>\n"
)

# seed, expected name/source, expected text, (placeholders the card uses instead of ours), card file
SEED_TABLE = [
    # No chat template (a 261 B pre-4.34 tokenizer_config): ChatML from <|im_start|> in added_tokens.json.
    ("rocket-3b", "chatml", "special tokens",
     "<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
     {"{system_prompt}": "{system}", "{prompt}": "{user}"}, "rocket-3b.card.txt"),
    # Template fixture (the card: "<|user|>\nList 10 synonyms ...<|endoftext|>\n<|assistant|>").
    ("stablelm-zephyr-3b", "chat_template", "chat_template",
     "<|user|>\n{prompt}<|endoftext|>\n<|assistant|>\n",
     {"{prompt}": 'List 10 synonyms for the word "tiny"'}, "stablelm-zephyr-3b.card.txt"),
    # Template fixture; the exl2 card's "Prompt format" block is the reference (BOS dropped).
    ("llama3-iterative-dpo-8b", "chat_template", "chat_template", LLAMA3_CARD_BLOCK, {}, "llama3-iterative-dpo-exl2.card.txt"),
    # Template fixture that refuses a system turn, as OpenChat's card shows no system prompt.
    ("starling-lm-11b-alpha", "chat_template", "chat_template",
     "GPT4 Correct User: {prompt}<|end_of_turn|>GPT4 Correct Assistant:", {}, "starling-lm-11b-alpha.card.txt"),
    # No template (a transformers 4.29 file): OpenAssistant from <|prompter|> in special_tokens_map.json.
    ("redpajama-3b-chat", "openassistant", "special tokens",
     "<|prompter|>{prompt}<|endoftext|><|assistant|>",
     {"{prompt}": "What is a meme, and what's the history behind this word?"}, "redpajama-3b-chat.card.txt"),
]


@pytest.mark.parametrize(("seed", "name", "source", "text", "card_words", "card"), SEED_TABLE, ids=[r[0] for r in SEED_TABLE])
def test_seed_prompt_format_matches_its_card(tmp_path: Path, seed: str, name: str, source: str, text: str,
                                             card_words: dict[str, str], card: str) -> None:
    fmt = prompt_format(seed_folder(tmp_path, seed))
    assert (fmt.name, fmt.source, fmt.text) == (name, source, text)
    documented = text.rstrip("\n")
    for ours, theirs in card_words.items():
        documented = documented.replace(ours, theirs)
    # Some card copies lost their line breaks: compare with whitespace collapsed.
    card_text = " ".join((SEEDS / card).read_text(encoding="utf-8").split())
    assert " ".join(documented.split()) in card_text, "the expected format must be what the card documents"


def test_llama3_by_special_tokens_alone_is_the_card_block(tmp_path: Path) -> None:
    folder = seed_folder(tmp_path, "llama3-iterative-dpo-8b")
    (folder / "tokenizer_config.json").unlink()  # the reference folder: special_tokens_map.json only
    fmt = prompt_format(folder)
    assert (fmt.name, fmt.source, fmt.text) == ("llama3", "special tokens", LLAMA3_CARD_BLOCK)
    assert "recognised llama3" in fmt.note


def test_broken_template_falls_back_and_says_why(tmp_path: Path) -> None:
    folder = seed_folder(tmp_path, "rocket-3b")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    fmt = prompt_format(folder)
    assert fmt.name == "chatml"
    assert "failed to render" in fmt.note and "no_such_filter" in fmt.note


def test_template_that_raises_for_every_turn_falls_back(tmp_path: Path) -> None:
    folder = seed_folder(tmp_path, "redpajama-3b-chat")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('nope') }}"}))
    fmt = prompt_format(folder)
    assert fmt.name == "openassistant" and "nope" in fmt.note


def test_unknown_without_template_or_tokens(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    fmt = prompt_format(folder)
    assert (fmt.name, fmt.text, fmt.known) == ("unknown", "", False)
    assert "--prompt-format" in fmt.note


@pytest.mark.parametrize(("value", "name", "text"), [
    ("chatml", "chatml", KNOWN_FORMATS["chatml"]),
    ("### User:\\n{prompt}\\n### Assistant:\\n", "custom", "### User:\n{prompt}\n### Assistant:\n"),
])
def test_override(tmp_path: Path, value: str, name: str, text: str) -> None:
    fmt = prompt_format(seed_folder(tmp_path, "starling-lm-11b-alpha"), override=value)
    assert (fmt.name, fmt.source, fmt.text) == (name, "--prompt-format", text)


def test_override_without_placeholder_is_refused() -> None:
    with pytest.raises(UnknownPromptFormat):
        parse_override("not-a-format")


def test_rendering_follows_transformers_whitespace_rules() -> None:
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before one.
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU: {{ m.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}"
    assert render_chat_template(template, {}) == "U: {prompt}\nA:"


def test_sandbox_refuses_unsafe_templates() -> None:
    from quantkit.prompt_format import TemplateRenderError

    with pytest.raises(TemplateRenderError, match="SecurityError"):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", {})
