"""exllamav2's `-so` status protocol and the console lines around it.

`conversion/bot_status.py` prints `[STATUS]{"stage": ..., "completion": ...}[/STATUS]` on stdout,
interleaved with ordinary log lines, of which `" ## "` marks an error and `" !! "` a warning, except
`" ## Warning: "` (model.py, attn.py print their warnings so). There is no "finished" status line: the
converter prints `" -- Finished"`.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: Stage names in the order a full job emits them (convert_exl2.py); `Embeddings` appears in both passes.
MEASURE_STAGES = ("Tokenizing (1)", "Embeddings", "Measuring")
CONVERT_STAGES = ("Optimizing", "Tokenizing (2)", "Embeddings", "Quantizing", "Compiling")

#: job_new.json "progress" values in the order convert_exl2.py's loop walks them.
PROGRESS = ("begin", "initial_embeddings", "measure_quant", "optimize", "tokens_cal", "embeddings", "quant", "compile", "finished")

_STATUS = re.compile(r"\[STATUS\](\{.*?\})\[/STATUS\]")


class StatusEvent(BaseModel):
    model_config = ConfigDict(frozen=True)

    stage: str
    completion: float


class LogLine(BaseModel):
    """One console line classified: a status event, an error (` ## `), a warning (` !! `) or plain text."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["status", "error", "warning", "text"]
    text: str
    status: StatusEvent | None = None


def parse_status(line: str) -> StatusEvent | None:
    """The status event in `line`, or None. Malformed JSON between the tags counts as no event."""
    m = _STATUS.search(line)
    if not m:
        return None
    try:
        data = json.loads(m.group(1))
        return StatusEvent(stage=str(data["stage"]), completion=float(data["completion"]))
    except (ValueError, KeyError, TypeError):
        return None


def classify(line: str) -> LogLine:
    text = line.rstrip("\r\n")
    event = parse_status(text)
    if event is not None:
        return LogLine(kind="status", text=text, status=event)
    # exllamav2 prefixes errors with " ## " (and " ** Error" for a corrupted job), warnings with " !! ".
    stripped = text.lstrip()
    if stripped.startswith("## Warning"):
        return LogLine(kind="warning", text=text.strip())
    if stripped.startswith("##") or stripped.startswith("** Error"):
        return LogLine(kind="error", text=text.strip())
    if stripped.startswith("!!") or stripped.startswith("** Warning"):
        return LogLine(kind="warning", text=text.strip())
    return LogLine(kind="text", text=text)
