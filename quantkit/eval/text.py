"""The evaluation text: a held-out sample (bundled, or `--source` as for calibration), cut into token rows.

The bundled sample is C4 web text (`evaluation/c4-sample.txt.gz`); quantkit's default calibration set is
Wikipedia, so the two share no document. A source that shares much text with the work folder's
calibration set would measure how well a quant remembers its calibration, not how good it is: that is
refused unless the user allows it (then said as a warning).
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from quantkit.branches import data_dir
from quantkit.errors import EvalOverlapsCalibration, EvalTextTooShort

BUNDLED = "c4-sample.txt.gz"
#: Word n-grams: 13 words, as the GPT-3 paper's contamination check, rarely repeat by chance.
NGRAM = 13
#: Share of the evaluation text's n-grams found in the calibration set above which they overlap.
OVERLAP_LIMIT = 0.05


class EvalText(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # "bundled:c4-sample" or the source as given
    sha256: str  # of the text itself (UTF-8), whatever file it came from
    text: str


class EvalTokens(BaseModel):
    model_config = ConfigDict(frozen=True)

    rows: list[list[int]]
    tokenizer_sha256: str
    used: str  # the part of the text the rows hold (what the overlap check reads)

    @property
    def count(self) -> int:
        return sum(len(r) for r in self.rows)


def load_text(source: str | None) -> EvalText:
    """The bundled sample, or every text of `source` (a file, dataset folder or Hub id, read as calibration
    sources are), joined by blank lines.

    Raises:
        CalibrationSourceMissing, CalibrationUnreadable, NoTextColumn (for `source`).
    """
    if source is None:
        with gzip.open(data_dir("evaluation") / BUNDLED, "rt", encoding="utf-8") as fh:
            text = fh.read()
        name = f"bundled:{BUNDLED.split('.')[0]}"
    else:
        from quantkit import calibration

        recipe = calibration.CalibrationRecipe(name="evaluation", source=source)
        ds, _fmt = calibration.load_source(recipe, Path.cwd())
        column, _chat = calibration._pick_column(ds, recipe)
        text = "\n\n".join(str(v) for v in ds[column] if v is not None and str(v).strip())
        name = source
    return EvalText(name=name, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(), text=text)


def tokenize(text: EvalText, model_dir: Path, *, rows: int, length: int) -> EvalTokens:
    """`rows` rows of `length` tokens, each starting with the model's BOS when it has one.

    Raises:
        TokenizerMissing, EvalTextTooShort.
    """
    from quantkit import calibration
    from quantkit.files import read_json

    tokenizer, tok_sha = calibration._tokenizer(model_dir)
    enc = tokenizer.encode(text.text, add_special_tokens=False)
    ids = enc.ids
    bos = read_json(model_dir / "config.json").get("bos_token_id") if (model_dir / "config.json").is_file() else None
    bos = bos if isinstance(bos, int) else None
    per_row = length - (1 if bos is not None else 0)
    if per_row < 2 or len(ids) < rows * per_row:
        raise EvalTextTooShort(text.name, len(ids), rows, length)
    out = [([bos] if bos is not None else []) + ids[i * per_row:(i + 1) * per_row] for i in range(rows)]
    return EvalTokens(rows=out, tokenizer_sha256=tok_sha, used=text.text[:enc.offsets[rows * per_row - 1][1]])


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def overlap(text: str, calibration_texts: list[str]) -> float:
    """Share of `text`'s word 13-grams (every 13th position) that occur in the calibration texts; a text
    shorter than 13 words is one n-gram of its length."""
    w = _words(text)
    n = min(NGRAM, len(w))
    if n == 0:
        return 0.0
    probes = [hash(tuple(w[i:i + n])) for i in range(0, len(w) - n + 1, n)]
    seen: set[int] = set()
    for t in calibration_texts:
        c = _words(t)
        seen.update(hash(tuple(c[i:i + n])) for i in range(max(0, len(c) - n + 1)))
    return sum(p in seen for p in probes) / len(probes)


def calibration_texts(parquet: Path) -> list[str]:
    import pyarrow.parquet as pq

    if not parquet.is_file():
        return []
    return [str(t) for t in pq.read_table(parquet, columns=["text"]).column("text").to_pylist() if t]


def check_overlap(text: EvalText, used: str, parquet: Path, *, allow: bool) -> str | None:
    """None, or the warning to say when `allow`; the evaluation text is only the part `used` of it.

    Raises:
        EvalOverlapsCalibration: above OVERLAP_LIMIT and not `allow`.
    """
    share = overlap(used, calibration_texts(parquet))
    if share <= OVERLAP_LIMIT:
        return None
    if not allow:
        raise EvalOverlapsCalibration(text.name, share, parquet)
    return (f"{share:.0%} of the evaluation text {text.name} is also in the calibration set {parquet}: "
            "the figures flatter the quants")
