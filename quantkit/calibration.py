"""Calibration sets: from a recipe or a file to the Parquet exllamav2 reads, plus a manifest.

exllamav2 0.3.2 (`conversion/tokenize.py`) reads a Parquet with fastparquet, joins *all* columns of a row
with spaces, encodes each row without BOS, concatenates and cuts `rows x length` tokens; too little
text dies in a `view()` traceback. So quantkit writes ONE `text` column, counts tokens with the model's
own tokenizer.json, and refuses a set with fewer than `rows x length` tokens before any GPU work.

Sources go through the `datasets` library: Parquet, JSONL (plain or .gz), CSV, plain text (one sample
per paragraph), a `save_to_disk` folder, or a Hub dataset id when online. A chat column (a list of
`{role, content}` or ShareGPT `{from, value}` turns) is rendered through the model's chat template
the way transformers does it: a sandboxed jinja2 environment with trim_blocks and lstrip_blocks.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from quantkit import __version__
from quantkit.branches import data_dir
from quantkit.errors import (
    CalibrationSourceMissing,
    CalibrationUnreadable,
    ConfigUnreadable,
    InvalidCount,
    NotEnoughText,
    NoTextColumn,
    OutputPathInvalid,
    RecipeUnknownKey,
    TokenizerMissing,
    UnknownCalibration,
)
from quantkit.chat_template import TemplateRenderError, compile_template, read_tokenizer_files, render
from quantkit.files import check_folder_path, write_bytes_atomic, write_json_atomic

Format = Literal["auto", "parquet", "jsonl", "csv", "text", "dataset"]
PARQUET_NAME = "calibration.parquet"
MANIFEST_NAME = "manifest.json"
_SUFFIXES = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".gz": "jsonl", ".csv": "csv", ".txt": "text", ".md": "text"}
_BUILDERS = {"parquet": "parquet", "jsonl": "json", "csv": "csv", "text": "text"}
#: ShareGPT turn names -> chat-template roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "tool": "tool"}


def check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidCount(name, value)
    return value


class CalibrationRecipe(BaseModel):
    """How to build a calibration set. Round-trips to the TOML files in `calibration/`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    description: str = ""
    source: str
    format: Format = "auto"
    split: str = "train"
    text_column: str | None = None
    messages_column: str | None = None
    seed: int = 0
    rows: int = 100
    length: int = 2048

    @field_validator("rows", "length")
    @classmethod
    def _positive(cls, v: int, info: Any) -> int:
        return check_count(info.field_name, v)


class Manifest(BaseModel):
    """What a built set is and where it came from; `sha256` is the Parquet file's."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    format: str
    split: str
    seed: int
    rows: int
    length: int
    column: str
    chat_template: bool
    samples: int
    tokens: int
    tokenizer_sha256: str
    sha256: str
    quantkit_version: str = __version__


class CalibrationSet(BaseModel):
    model_config = ConfigDict(frozen=True)

    parquet: Path
    manifest: Manifest


# ---- recipes ----------------------------------------------------------------------------------------


def recipe_dir() -> Path:
    return data_dir("calibration")


def known_recipes() -> list[str]:
    return sorted(p.stem for p in recipe_dir().glob("*.toml"))


def load_recipe(ref: str, **overrides: Any) -> tuple[CalibrationRecipe, Path]:
    """A named recipe (`default`), a recipe TOML path, or a data file used as-is with default settings.
    Returns the recipe and the folder its relative `source` is resolved against.

    Raises:
        UnknownCalibration, ConfigUnreadable, InvalidCount.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    path = Path(ref).expanduser()
    if path.suffix == ".toml" and path.is_file():
        toml_path, name = path, path.stem
    elif (recipe_dir() / f"{ref}.toml").is_file():
        toml_path, name = recipe_dir() / f"{ref}.toml", ref
    elif path.exists():
        return CalibrationRecipe(name=path.name, source=str(path.resolve()), **overrides), Path.cwd()
    else:
        raise UnknownCalibration(ref, known_recipes())
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        for key in data:  # a typo would otherwise be ignored (or said without its name)
            if key not in CalibrationRecipe.model_fields:
                raise RecipeUnknownKey(toml_path, key, "the calibration recipe", list(CalibrationRecipe.model_fields))
        return CalibrationRecipe(**({"name": name} | data | overrides)), toml_path.parent
    except (OSError, tomllib.TOMLDecodeError, ValidationError, TypeError) as exc:
        if isinstance(exc, ValidationError) and any(err["loc"] in (("rows",), ("length",)) for err in exc.errors()):
            bad = next(err for err in exc.errors() if err["loc"] in (("rows",), ("length",)))
            raise InvalidCount(str(bad["loc"][0]), bad.get("input")) from None
        raise ConfigUnreadable(toml_path, f"not a calibration recipe ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc


# ---- reading a source -------------------------------------------------------------------------------


def _format_of(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "dataset"
    fmt_ = _SUFFIXES.get(path.suffix.lower())
    if fmt_ is None:
        raise CalibrationUnreadable(str(path), f"cannot tell the format from the suffix {path.suffix!r}")
    return fmt_


def load_source(recipe: CalibrationRecipe, base: Path) -> tuple[Any, str]:
    """The source as a `datasets.Dataset`, and the format it was read as.

    Raises:
        CalibrationSourceMissing, CalibrationUnreadable.
    """
    import datasets  # heavy: only when building a set

    if not recipe.source:
        raise CalibrationUnreadable(recipe.name, "the recipe names no source: pass --source FILE_OR_DATASET")
    path = Path(recipe.source).expanduser()
    if not path.is_absolute():
        path = base / path
    datasets.disable_progress_bars()
    try:
        if path.exists():
            fmt = _format_of(path, recipe.format)
            if fmt == "dataset":
                try:
                    ds = datasets.load_from_disk(str(path))
                except FileNotFoundError:
                    ds = datasets.load_dataset(str(path), split=recipe.split)
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[recipe.split]
                return ds, fmt
            kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
            return datasets.load_dataset(_BUILDERS[fmt], data_files=str(path), split="train", **kwargs), fmt
        if "/" in recipe.source and not recipe.source.startswith((".", "/")):
            from quantkit import hub

            hub.ensure_reachable(recipe.source)
            return datasets.load_dataset(recipe.source, split=recipe.split), "hub"
    except (CalibrationUnreadable, CalibrationSourceMissing):
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/pyarrow raise many types for a bad file
        if exc.__class__.__name__ == "HubOffline":
            raise
        raise CalibrationUnreadable(str(path), f"cannot be read ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})") from exc
    raise CalibrationSourceMissing(recipe.source)


# ---- chat templates ---------------------------------------------------------------------------------


def chat_template(model_dir: Path) -> tuple[Any, dict[str, str]]:
    """The model's compiled chat template and its special tokens (`quantkit.chat_template`'s reader).

    Raises:
        TokenizerMissing: the model has no chat template.
        CalibrationUnreadable: it does not compile.
    """
    files = read_tokenizer_files(model_dir)
    if files.chat_template is None:
        raise TokenizerMissing(model_dir, "chat template (chat_template.jinja, tokenizer_config.json \"chat_template\" or chat_template.json)")
    try:
        return compile_template(files.chat_template), files.special
    except TemplateRenderError as exc:
        raise CalibrationUnreadable("chat template", str(exc)) from exc


def render_chat(compiled: Any, messages: list[dict[str, str]], tokens: dict[str, str]) -> str:
    """One conversation as text, as transformers' `apply_chat_template(tokenize=False)` gives it."""
    try:
        return render(compiled, messages, tokens, add_generation_prompt=False)
    except TemplateRenderError as exc:
        raise CalibrationUnreadable("chat template", f"it fails to render a conversation ({exc})") from exc


def to_messages(value: Any, *, source: str = "calibration source") -> list[dict[str, str]]:
    """Chat turns from a messages cell: a list of {role, content} or ShareGPT {from, value}, or that as a
    JSON string.

    Raises:
        CalibrationUnreadable: the cell is not chat turns.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise CalibrationUnreadable(source, f"a messages cell is not JSON chat turns ({value[:40]!r})") from None
    if value is not None and not isinstance(value, list):
        raise CalibrationUnreadable(source, f"a messages cell is a {type(value).__name__}, not a list of chat turns")
    out = []
    for turn in value or []:
        if not isinstance(turn, dict):
            raise CalibrationUnreadable(source, f"a chat turn is a {type(turn).__name__}, not {{role, content}} or {{from, value}}")
        if "role" in turn:
            out.append({"role": str(turn["role"]), "content": str(turn.get("content") or "")})
        else:
            out.append({"role": _SHAREGPT_ROLES.get(str(turn.get("from")), str(turn.get("from"))), "content": str(turn.get("value") or "")})
    return out


# ---- building ---------------------------------------------------------------------------------------


def _pick_column(ds: Any, recipe: CalibrationRecipe) -> tuple[str, bool]:
    columns = list(ds.column_names)
    if recipe.messages_column:
        wanted = recipe.messages_column
        for c in (wanted, "messages", "conversations"):
            if c in columns:
                return c, True
        raise NoTextColumn(recipe.source, wanted, columns)
    wanted = recipe.text_column or "text"
    if wanted in columns:
        return wanted, False
    if recipe.text_column is None and len(columns) == 1:
        return columns[0], False
    raise NoTextColumn(recipe.source, wanted, columns)


def _tokenizer(model_dir: Path) -> tuple[Any, str]:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise TokenizerMissing(model_dir, "tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a corrupt file
        raise ConfigUnreadable(path, f"not a tokenizer ({str(exc).splitlines()[0][:120]})") from exc
    return tokenizer, hashlib.sha256(path.read_bytes()).hexdigest()


def build(recipe: CalibrationRecipe, base: Path, model_dir: Path, out_dir: Path) -> CalibrationSet:
    """Sample, render and count the recipe's text with the model's tokenizer; write the Parquet + manifest.

    Raises:
        CalibrationSourceMissing, CalibrationUnreadable, NoTextColumn, NotEnoughText, TokenizerMissing.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_folder_path(out_dir)
    tokenizer, tok_sha = _tokenizer(model_dir)
    ds, fmt = load_source(recipe, base)
    if len(ds) == 0:
        raise CalibrationUnreadable(recipe.source, "it is empty")
    column, chat = _pick_column(ds, recipe)
    template, specials = chat_template(model_dir) if chat else (None, {})
    need = recipe.rows * recipe.length
    texts: list[str] = []
    tokens = 0
    # A seeded permutation of the documents: the same recipe and source give the same set.
    for row in ds.shuffle(seed=recipe.seed):
        value = row[column]
        text = render_chat(template, to_messages(value, source=recipe.source or "calibration source"), specials) if chat else ("" if value is None else str(value))
        if not text.strip():
            continue
        texts.append(text)
        # exllamav2 encodes each row without BOS and with specials as plain text; counting specials as
        # single tokens here can only undercount what it will see.
        tokens += len(tokenizer.encode(text, add_special_tokens=False).ids)
        if tokens >= need:
            break
    if tokens < need:
        raise NotEnoughText(recipe.source, tokens, recipe.rows, recipe.length)
    parquet = out_dir / PARQUET_NAME
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), buf)
    try:
        write_bytes_atomic(parquet, buf.getvalue().to_pybytes())
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputPathInvalid(out_dir, "a file is in the way of this folder") from exc
    except PermissionError as exc:
        raise OutputPathInvalid(out_dir, f"cannot write there ({exc.strerror})") from exc
    manifest = Manifest(
        name=recipe.name, source=recipe.source, format=fmt, split=recipe.split, seed=recipe.seed, rows=recipe.rows,
        length=recipe.length, column=column, chat_template=chat, samples=len(texts), tokens=tokens,
        tokenizer_sha256=tok_sha, sha256=hashlib.sha256(parquet.read_bytes()).hexdigest(),
    )
    write_json_atomic(out_dir / MANIFEST_NAME, manifest.model_dump())
    return CalibrationSet(parquet=parquet, manifest=manifest)


def read_set(folder: Path) -> CalibrationSet | None:
    """A built set in `folder` whose Parquet still matches its manifest, else None."""
    try:
        manifest = Manifest.model_validate_json((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        data = (folder / PARQUET_NAME).read_bytes()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(data).hexdigest() != manifest.sha256:
        return None
    return CalibrationSet(parquet=folder / PARQUET_NAME, manifest=manifest)


def preview(recipe: CalibrationRecipe, base: Path, n: int = 3, chars: int = 300) -> tuple[list[str], int, str]:
    """The first `n` samples the recipe would take (raw column text; chat rows as JSON), the source's
    row count and its format. Needs no model."""
    ds, fmt = load_source(recipe, base)
    if len(ds) == 0:
        raise CalibrationUnreadable(recipe.source, "it is empty")
    column, _chat = _pick_column(ds, recipe)
    out = []
    for row in ds.shuffle(seed=recipe.seed).select(range(min(n, len(ds)))):
        value = row[column]
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        out.append(text[:chars])
    return out, len(ds), fmt

