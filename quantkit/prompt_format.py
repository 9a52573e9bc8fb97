"""The prompt format a model card shows: the source's chat template rendered with placeholders.

`{system_prompt}` and `{prompt}` stand in for the messages, rendered the way transformers'
`apply_chat_template` renders (a sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`,
the tokenizer's special tokens as variables, `add_generation_prompt=True`). Models without a chat
template (older ones such as Rocket-3B or RedPajama-3B) are recognised by their special tokens; when
nothing matches, the format is "unknown" and the user can name one with `--prompt-format`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from quantkit.errors import UnknownPromptFormat

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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class TokenizerFiles(BaseModel):
    """The tokenizer facts a prompt format needs, read from the files beside config.json."""

    model_config = ConfigDict(frozen=True)

    chat_template: str | None
    special: dict[str, str]  # bos_token, eos_token, ... as transformers passes them to templates
    tokens: frozenset[str]  # every special / added token string
    name: str  # the model's name (_name_or_path or the folder name), for formats without special tokens


def read_tokenizer_files(folder: Path) -> TokenizerFiles:
    cfg = _read_json(folder / "tokenizer_config.json") or {}
    smap = _read_json(folder / "special_tokens_map.json") or {}
    added = _read_json(folder / "added_tokens.json") or {}
    tok = _read_json(folder / "tokenizer.json") or {}
    config = _read_json(folder / "config.json") or {}

    template: Any = cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # transformers >= 4.47 saves it as its own file
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and isinstance(ct := _read_json(folder / "chat_template.json"), dict):
        template = ct.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)

    # transformers' legacy load path (no added_tokens_decoder) lets special_tokens_map.json override
    # tokenizer_config.json; the modern path keeps tokenizer_config's values.
    legacy = "added_tokens_decoder" not in cfg
    special: dict[str, str] = {}
    keys = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
    for source in ((cfg, smap) if legacy else (smap, cfg)):
        for key in keys:
            if (text := _token_text(source.get(key))) is not None:
                special[key] = text

    tokens: set[str] = set(special.values())
    for source in (cfg, smap):
        for t in source.get("additional_special_tokens") or []:
            if (text := _token_text(t)) is not None:
                tokens.add(text)
    for t in (cfg.get("added_tokens_decoder") or {}).values():
        if (text := _token_text(t)) is not None:
            tokens.add(text)
    if isinstance(added, dict):
        tokens.update(k for k in added if isinstance(k, str))
    for t in (tok.get("added_tokens") or []) if isinstance(tok, dict) else []:
        if isinstance(t, dict) and isinstance(t.get("content"), str):
            tokens.add(t["content"])
    name = str(config.get("_name_or_path") or "") + " " + folder.name
    return TokenizerFiles(
        chat_template=template if isinstance(template, str) and template.strip() else None,
        special=special,
        tokens=frozenset(tokens),
        name=name.strip(),
    )


class TemplateRenderError(Exception):
    """The chat template could not be rendered into a usable prompt format (the reason is the message)."""


def _environment() -> Any:
    # transformers' utils/chat_template_utils.py `_compile_jinja_template`: the same settings, globals
    # and tojson filter, so a template renders here exactly as apply_chat_template renders it.
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        # Fixed, so a card does not change from one day to the next (Llama-3.1 prints "Today Date").
        from datetime import datetime

        return datetime(2024, 7, 26).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render_chat_template(template: str, special: dict[str, str]) -> str:
    """Render `template` for one system + user turn with a generation prompt, as the card shows it.

    A template that refuses a system message (many raise "roles must alternate" or "System role not
    supported") is rendered with the user turn alone. A leading bos token is dropped: loaders add it.

    Raises:
        TemplateRenderError: the template does not compile, fails for a lone user turn too, or drops the prompt.
    """
    from jinja2.exceptions import TemplateError

    try:
        compiled = _environment().from_string(template)
    except TemplateError as exc:
        raise TemplateRenderError(f"it does not compile ({type(exc).__name__}: {exc})") from exc

    def render(messages: list[dict[str, str]]) -> str:
        return compiled.render(messages=messages, add_generation_prompt=True, tools=None, documents=None, **special)

    user = {"role": "user", "content": PROMPT}
    try:
        text = render([{"role": "system", "content": SYSTEM}, user])
    except Exception:  # noqa: BLE001 - any failure with a system turn: try the user turn alone
        try:
            text = render([user])
        except Exception as exc:  # noqa: BLE001 - templates are user code; any error is a render failure
            raise TemplateRenderError(f"{type(exc).__name__}: {exc}") from exc
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
