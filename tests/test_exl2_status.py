from pathlib import Path

import pytest

from quantkit.exl2.status import classify, parse_status

LOG = Path(__file__).parent / "fixtures" / "exl2" / "convert-log.txt"


def test_status_lines_from_a_log_parse_in_order():
    events = [e for e in (parse_status(line) for line in LOG.read_text().splitlines()) if e is not None]
    assert [(e.stage, e.completion) for e in events] == [
        ("Tokenizing (1)", 0.0), ("Tokenizing (1)", 1.0), ("Embeddings", 0.0), ("Embeddings", 1.0),
        ("Measuring", 0.0), ("Measuring", 0.0152), ("Measuring", 1.0),
    ]  # the truncated line and the one without "completion" are not events


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (' ## Measurement/inference error (2): hidden_states', "error"),
        (" ** Error: Corrupted job", "error"),
        (" ## Error: Unable to fit output tensor in single shard.", "error"),
        (" !! Warning: target bitrate 9.0 will likely not be attainable", "warning"),
        (" ** Warning: Not enough sample data in x.parquet", "warning"),
        # model.py and attn.py print their warnings with the error marker
        (" ## Warning: The installed version of PyTorch is 2.13.0+cpu and does not support CUDA or ROCm.", "warning"),
        (" ## Warning: Flash Attention is installed but unsupported GPUs were detected.", "warning"),
        (" -- Finished", "text"),
        ('noise [STATUS]{"stage": "Quantizing", "completion": 0.5}[/STATUS] noise', "status"),
        ('[STATUS]{"stage": "Quantizing", "completion": "x"}[/STATUS]', "text"),
    ],
)
def test_classify(line, kind):
    assert classify(line + "\n").kind == kind
