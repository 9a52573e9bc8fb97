"""The evaluation's files, each written and read back by one model: a task's result (from the worker),
the text it ran on, and the report WORK/eval.json."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantkit.files import write_text_atomic

Status = Literal["done", "failed"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskResult(_Frozen):
    """WORK/eval/reference.json and WORK/eval/branches/<branch>.json: one model's figures, or why not.
    `key` names what it was computed for (text, reference, branch files); a different key is stale."""

    name: str
    key: str
    status: Status
    error: str | None = None
    mode: str | None = None  # full | layers | transformers | none
    exllamav2_version: str = "unknown"
    tokens: int | None = None
    perplexity: float | None = None
    kl_mean: float | None = None  # branches only, from here on
    kl_median: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None


class TextInfo(_Frozen):
    """The evaluated text: where it came from and what of it the rows hold."""

    name: str  # "bundled:c4-sample" or the --source as given
    sha256: str  # of the whole text (UTF-8)
    rows: int
    length: int
    tokens: int
    tokenizer_sha256: str


class ReferenceInfo(_Frozen):
    model: str  # the folder's name, never a local path (eval.json is published)
    mode: str | None  # how its logits were computed
    perplexity: float | None


class BranchEval(_Frozen):
    branch: str
    status: Status
    error: str | None = None
    mode: str | None = None  # full | layers
    bits: float | None = None
    head_bits: int | None = None
    achieved_bpw: float | None = None
    bytes: int | None = None
    perplexity: float | None = None
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p99: float | None = None
    top1_agreement: float | None = None


class EvalReport(_Frozen):
    """WORK/eval.json, also published on main."""

    version: int = 1
    text: TextInfo
    exllamav2_version: str
    reference: ReferenceInfo
    top_k: int
    branches: dict[str, BranchEval] = Field(default_factory=dict)

    def failed(self) -> list[str]:
        return [b for b, r in self.branches.items() if r.status == "failed"]


def write(path: Path, record: BaseModel) -> None:
    write_text_atomic(path, record.model_dump_json(indent=2) + "\n")


def read_result(path: Path) -> TaskResult | None:
    """A task's result, or None when missing or unreadable (then it is computed again)."""
    try:
        return TaskResult.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
