"""Calibration sets from each input kind, with the model's tokenizer and chat template."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quantkit import calibration as cal
from quantkit.errors import CalibrationSourceMissing, CalibrationUnreadable, InvalidCount, NotEnoughText, NoTextColumn, UnknownCalibration
from tiny import TEXT

DOCS = [f"Document {i}. " + TEXT for i in range(40)]
CHATS = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": TEXT}] for i in range(40)]


def write_source(folder, kind):
    if kind == "parquet":
        pq.write_table(pa.table({"id": list(range(40)), "text": DOCS}), p := folder / "src.parquet")
    elif kind == "jsonl":
        (p := folder / "src.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    elif kind == "csv":
        import csv

        with (p := folder / "src.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["text"])
            w.writerows([d] for d in DOCS)
    elif kind == "text":
        (p := folder / "src.txt").write_text("\n\n".join(DOCS))
    else:  # a datasets save_to_disk folder
        import datasets

        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(p := folder / "src_ds"))
    return p


@pytest.mark.parametrize("kind", ["parquet", "jsonl", "csv", "text", "dataset"])
def test_build_from_each_input_kind(tmp_path, tiny_llama, kind):
    src = write_source(tmp_path, kind)
    recipe, base = cal.load_recipe(str(src), rows=4, length=64)
    built = cal.build(recipe, base, tiny_llama, tmp_path / "out")
    table = pq.read_table(built.parquet)
    assert table.column_names == ["text"]  # exllamav2 joins all columns: the id column must not leak in
    assert built.manifest.tokens >= 4 * 64
    assert all(t in DOCS for t in table.column("text").to_pylist()) if kind != "text" else table.num_rows > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(built.parquet.read_bytes()).hexdigest()
    assert cal.read_set(tmp_path / "out") is not None


def test_seeded_sampling_is_reproducible_and_seed_dependent(tmp_path, tiny_llama):
    src = write_source(tmp_path, "jsonl")
    r0, base = cal.load_recipe(str(src), rows=2, length=64, seed=0)
    a = cal.build(r0, base, tiny_llama, tmp_path / "a").manifest.sha256
    b = cal.build(r0, base, tiny_llama, tmp_path / "b").manifest.sha256
    c = cal.build(r0.model_copy(update={"seed": 1}), base, tiny_llama, tmp_path / "c").manifest.sha256
    assert a == b != c


def test_chat_messages_render_through_the_models_template(tmp_path, tiny_llama):
    (src := tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    recipe, base = cal.load_recipe(str(src), rows=2, length=64, messages_column="messages")
    built = cal.build(recipe, base, tiny_llama, tmp_path / "out")
    first = pq.read_table(built.parquet).column("text")[0].as_py()
    assert first.startswith("<s><|user|>\nQuestion ") and "</s>\n<|assistant|>\n" in first
    assert built.manifest.chat_template


def test_sharegpt_turns_and_the_toxic_qna_recipe(tmp_path, tiny_llama):
    rows = [{"conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": TEXT}]} for _ in range(30)]
    pq.write_table(pa.table({"conversations": [r["conversations"] for r in rows]}), src := tmp_path / "qa.parquet")
    recipe, base = cal.load_recipe("toxic-qna", source=str(src), rows=2, length=64)
    text = pq.read_table(cal.build(recipe, base, tiny_llama, tmp_path / "out").parquet).column("text")[0].as_py()
    assert "<|user|>\nWhy?" in text and "<|assistant|>\n" in text


def test_default_recipe_builds_offline_from_the_bundled_sample(tmp_path, tiny_llama):
    recipe, base = cal.load_recipe("default", rows=8, length=512)
    built = cal.build(recipe, base, tiny_llama, tmp_path / "out")
    assert built.manifest.source == "wiki-sample.jsonl.gz" and built.manifest.tokens >= 8 * 512


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda d: d / "missing.jsonl", CalibrationSourceMissing),
        (lambda d: (d / "empty.jsonl").write_text("") and d / "empty.jsonl" or d / "empty.jsonl", CalibrationUnreadable),
        (lambda d: (d / "bad.parquet").write_text("not parquet") and d / "bad.parquet", CalibrationUnreadable),
        (lambda d: (d / "x.bin").write_text("?") and d / "x.bin", CalibrationUnreadable),  # unknown format
        (lambda d: (d / "other.jsonl").write_text('{"a": "x", "b": "y"}\n') and d / "other.jsonl", NoTextColumn),
        (lambda d: (d / "short.jsonl").write_text('{"text": "too short"}\n') and d / "short.jsonl", NotEnoughText),
    ],
)
def test_bad_sources_are_refused(tmp_path, tiny_llama, make, error):
    src = make(tmp_path)
    if error is CalibrationSourceMissing:
        with pytest.raises(UnknownCalibration):  # neither a recipe nor an existing file
            cal.load_recipe(str(src))
        recipe, base = cal.CalibrationRecipe(source=str(src)), tmp_path
    else:
        recipe, base = cal.load_recipe(str(src), rows=4, length=64)
    with pytest.raises(error):
        cal.build(recipe, base, tiny_llama, tmp_path / "out")
    assert not (tmp_path / "out" / "calibration.parquet").exists()


@pytest.mark.parametrize("bad", [{"rows": 0}, {"length": -5}])
def test_rows_and_length_must_be_positive(bad):
    with pytest.raises(InvalidCount):
        cal.load_recipe("default", **bad)


# A Llama-3.2-style template: `strftime_now` for the date and `{% break %}` (jinja's loopcontrols), which
# transformers allows. The card and calibration render through one renderer, so both accept it.
LLAMA32_STYLE = (
    "{{ bos_token }}{% set date = strftime_now('%d %b %Y') %}"
    "<|system|>\nToday Date: {{ date }}\n"
    "{% for m in messages %}{% if loop.index > 8 %}{% break %}{% endif %}"
    "<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja", "chat_template.json"])
def test_card_and_calibration_render_the_same_templates(tmp_path, tiny_llama, where):
    import shutil

    from quantkit.prompt_format import prompt_format

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    if where == "tokenizer_config.json":
        cfg["chat_template"] = LLAMA32_STYLE
    elif where == "chat_template.jinja":
        (model / where).write_text(LLAMA32_STYLE)
    else:
        (model / where).write_text(json.dumps({"chat_template": LLAMA32_STYLE}))
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src := tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    recipe, base = cal.load_recipe(str(src), rows=2, length=64, messages_column="messages")
    first = pq.read_table(cal.build(recipe, base, model, tmp_path / "out").parquet).column("text")[0].as_py()
    assert first.startswith("<s><|system|>\nToday Date: 26 Jul 2024\n<|user|>\nQuestion ")
    card = prompt_format(model)
    assert card.source == "chat_template" and card.text.startswith("<|system|>\nToday Date: 26 Jul 2024\n<|system|>\n{system_prompt}")


def test_a_template_that_raises_is_refused_for_calibration(tmp_path, tiny_llama):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text()) | {"chat_template": "{{ raise_exception('no system role') }}"}
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    (src := tmp_path / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS))
    recipe, base = cal.load_recipe(str(src), rows=2, length=64, messages_column="messages")
    with pytest.raises(CalibrationUnreadable, match="no system role"):
        cal.build(recipe, base, model, tmp_path / "out")
