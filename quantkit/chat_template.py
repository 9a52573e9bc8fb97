"""A model's chat template and its tokenizer's special tokens, rendered the way transformers renders them.

One reader and one renderer, used by the model card (its prompt format) and by calibration (chat turns
into text), so a template that renders for one renders for the other. The rules are transformers'
`utils/chat_template_utils.py` (`_compile_jinja_template`): an immutable sandbox, `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension (`{% break %}`), the `raise_exception` and `strftime_now`
globals, and its `tojson` filter. The template comes from `chat_template.jinja` (transformers >= 4.47
saves it there), else tokenizer_config.json's "chat_template", else chat_template.json; a list of named
templates gives its "default".
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

#: `strftime_now` renders this day, not today: a card or a calibration set made twice must not differ
#: (Llama-3.1/3.2 templates print "Today Date").
FIXED_NOW = datetime(2024, 7, 26)

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateRenderError(Exception):
    """The chat template does not compile or fails to render (the reason is the message).

    Not a QuantkitError: each caller says what it means for its step (the card falls back to a known
    format; calibration refuses the source).
    """


class TokenizerFiles(BaseModel):
    """The tokenizer facts a chat template needs, read from the files beside config.json."""

    model_config = ConfigDict(frozen=True)

    chat_template: str | None
    special: dict[str, str]  # bos_token, eos_token, ... as transformers passes them to templates
    tokens: frozenset[str]  # every special / added token string
    name: str  # the model's name (_name_or_path or the folder name), for formats without special tokens


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # {"content": "<s>", ...}
        return value["content"]
    return None


def read_tokenizer_files(folder: Path) -> TokenizerFiles:
    """The chat template and special tokens of the model in `folder`; files that are missing or not JSON
    count as absent."""
    cfg = _read_json(folder / "tokenizer_config.json") or {}
    smap = _read_json(folder / "special_tokens_map.json") or {}
    added = _read_json(folder / "added_tokens.json") or {}
    tok = _read_json(folder / "tokenizer.json") or {}
    config = _read_json(folder / "config.json") or {}

    template: Any = cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
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
    for source in ((cfg, smap) if legacy else (smap, cfg)):
        for key in SPECIAL_KEYS:
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


def _environment() -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return FIXED_NOW.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def compile_template(template: str) -> Any:
    """The compiled template, to render many conversations with.

    Raises:
        TemplateRenderError: it does not compile.
    """
    from jinja2.exceptions import TemplateError

    try:
        return _environment().from_string(template)
    except TemplateError as exc:
        raise TemplateRenderError(f"it does not compile ({type(exc).__name__}: {exc})") from exc


def render(compiled: Any, messages: list[dict[str, str]], special: dict[str, str], *, add_generation_prompt: bool) -> str:
    """One conversation through a compiled template, as `apply_chat_template(tokenize=False)` renders it.

    Raises:
        TemplateRenderError: the template raised (its own `raise_exception`, or any error: templates are
        user code).
    """
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                               **special)
    except Exception as exc:  # noqa: BLE001 - templates are user code; any error is a render failure
        raise TemplateRenderError(f"{type(exc).__name__}: {exc}") from exc
