"""The prompt format a model card shows: the source's chat template rendered with placeholders.

`{system_prompt}` and `{prompt}` stand in for the messages, rendered by `quantkit.chat_template` (the
renderer calibration uses too, with transformers' rules) with `add_generation_prompt=True`. Models without a chat
template (older ones such as Rocket-3B or RedPajama-3B) are recognised by their special tokens; when
nothing matches, the format is "unknown" and the user can name one with `--prompt-format`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.chat_template import TemplateRenderError, TokenizerFiles, compile_template, read_tokenizer_files, render
from quantkit.errors import UnknownPromptFormat

__all__ = ["KNOWN_FORMATS", "PromptFormat", "TemplateRenderError", "parse_override", "prompt_format", "recognise",
           "render_chat_template"]

SYSTEM = "{system_prompt}"
PROMPT = "{prompt}"


class PromptFormat(BaseModel):
    """What the card prints under "Prompt format", and where it came from."""

    model_config = ConfigDict(frozen=True)

    name: str  # "chat_template", a KNOWN_FORMATS key, "custom" or "unknown"
    text: str  # with {system_prompt} / {prompt} placeholders; "" when unknown
    source: str  # "chat_template" | "special tokens" | "model name" | "--prompt-format" | "none"
    note: str = ""  # why a fallback was taken, said on screen and kept out of the card

    @property
    def known(self) -> bool:
        return self.name != "unknown"


# Known formats for models without a chat template. `{eos}` is the model's eos token. Each entry's text
# is what its family's model cards document (a format documented without a system turn has none).
KNOWN_FORMATS: dict[str, str] = {
    "chatml": "<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n",
    # As ../shared/seeds/llama3-iterative-dpo-exl2.card.txt prints it (the stock Meta template puts
    # "\n\n" after <|end_header_id|> and nothing after <|eot_id|>; its tokenizer_config says which).
    "llama3": (
        "<|start_header_id|>system<|end_header_id|>\n{system_prompt}<|eot_id|>\n"
        "<|start_header_id|>user<|end_header_id|>\n{prompt}<|eot_id|>\n"
        "<|start_header_id|>assistant<|end_header_id|>\n"
    ),
    "phi3": "<|system|>\n{system_prompt}<|end|>\n<|user|>\n{prompt}<|end|>\n<|assistant|>\n",
    "zephyr": "<|user|>\n{prompt}{eos}\n<|assistant|>\n",
    "openchat": "GPT4 Correct User: {prompt}<|end_of_turn|>GPT4 Correct Assistant:",
    "openassistant": "<|prompter|>{prompt}{eos}<|assistant|>",
    "gemma": "<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n",
    "mistral": "[INST] {prompt} [/INST]",
    "redpajama-chat": "<human>: {prompt}\n<bot>:",
    "alpaca": "### Instruction:\n{prompt}\n\n### Response:\n",
}

# Special tokens that identify a format, checked in order (phi3 before zephyr: both have <|user|>).
_TOKEN_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("chatml", ("<|im_start|>", "<|im_end|>")),
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>")),
    ("llama3", ("<|begin_of_text|>", "<|eot_id|>")),  # what a special_tokens_map.json alone shows
    ("phi3", ("<|user|>", "<|end|>")),
    ("zephyr", ("<|user|>", "<|assistant|>")),
    ("openchat", ("<|end_of_turn|>",)),
    ("openassistant", ("<|prompter|>", "<|assistant|>")),
    ("gemma", ("<start_of_turn>", "<end_of_turn>")),
    ("mistral", ("[INST]", "[/INST]")),
]

# Formats written as plain text, not special tokens: recognised by the model's name, lowercased.
_NAME_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("redpajama-chat", ("redpajama-incite", "chat")),
]


def render_chat_template(template: str, special: dict[str, str]) -> str:
    """Render `template` for one system + user turn with a generation prompt, as the card shows it.

    A template that refuses a system message (many raise "roles must alternate" or "System role not
    supported") is rendered with the user turn alone. A leading bos token is dropped: loaders add it.

    Raises:
        TemplateRenderError: the template does not compile, fails for a lone user turn too, or drops the prompt.
    """
    compiled = compile_template(template)

    def _render(messages: list[dict[str, str]]) -> str:
        return render(compiled, messages, special, add_generation_prompt=True)

    user = {"role": "user", "content": PROMPT}
    try:
        text = _render([{"role": "system", "content": SYSTEM}, user])
    except TemplateRenderError:  # any failure with a system turn: try the user turn alone
        text = _render([user])
    if PROMPT not in text:
        raise TemplateRenderError("its output does not contain the user's message")
    bos = special.get("bos_token")
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def _known(name: str, special: dict[str, str]) -> str:
    return KNOWN_FORMATS[name].replace("{eos}", special.get("eos_token") or "</s>")


def recognise(files: TokenizerFiles) -> tuple[str, str] | None:
    """(format name, how it was recognised) from special tokens or the model's name, or None."""
    for name, needed in _TOKEN_RULES:
        if all(t in files.tokens for t in needed):
            return name, "special tokens"
    lowered = files.name.lower()
    for name, parts in _NAME_RULES:
        if all(p in lowered for p in parts):
            return name, "model name"
    return None


def parse_override(value: str, special: dict[str, str] | None = None) -> PromptFormat:
    """`--prompt-format`: a KNOWN_FORMATS name, a file holding the format, or the format itself
    (containing {prompt}; "\\n" stands for a newline)."""
    special = special or {}
    if value in KNOWN_FORMATS:
        return PromptFormat(name=value, text=_known(value, special), source="--prompt-format")
    path = Path(value).expanduser()
    if len(value) < 4096 and path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        text = value.replace("\\n", "\n")
    if PROMPT not in text:
        raise UnknownPromptFormat(value, sorted(KNOWN_FORMATS))
    return PromptFormat(name="custom", text=text, source="--prompt-format")


def prompt_format(folder: Path, *, override: str | None = None) -> PromptFormat:
    """The prompt format for the model in `folder` (tokenizer_config.json and friends).

    Order: `override`; the chat template; known special tokens; the model's name; else "unknown".
    A template that fails to render falls back to recognition, with the reason in `note`.
    """
    files = read_tokenizer_files(folder)
    if override:
        return parse_override(override, files.special)
    note = ""
    if files.chat_template is not None:
        try:
            text = render_chat_template(files.chat_template, files.special)
            return PromptFormat(name="chat_template", text=text, source="chat_template")
        except TemplateRenderError as exc:
            note = f"the chat_template in tokenizer_config.json failed to render: {exc}"
    found = recognise(files)
    if found is not None:
        name, how = found
        said = f"{note}; " if note else ""
        why = f"{said}no usable chat template: recognised {name} from its {how}"
        return PromptFormat(name=name, text=_known(name, files.special), source=how, note=why)
    why = (f"{note}; " if note else "no chat template and no known special tokens; ") + "pass --prompt-format"
    return PromptFormat(name="unknown", text="", source="none", note=why)
