"""Calibration text from every kind of source; seeded windows; evaluation tokens."""

import json

import pytest
import torch

from hf_prune.calibration.data import evaluation_tokens, load_documents, sample_windows
from hf_prune.errors import CalibrationDataError


def test_windows_are_seeded_exact_length_and_from_the_text(tokenizer, calib_texts):
    a = sample_windows(calib_texts, tokenizer, 6, 100, seed=0)
    b = sample_windows(calib_texts, tokenizer, 6, 100, seed=0)
    c = sample_windows(calib_texts, tokenizer, 6, 100, seed=1)
    assert a.shape == (6, 100) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    decoded = tokenizer.decode(a[0])
    joined = "\n\n".join(calib_texts)
    assert decoded[20:60] in joined


def test_short_documents_are_packed(tokenizer):
    docs = [f"Fortune number {i}: a short saying about life." for i in range(200)]
    w = sample_windows(docs, tokenizer, 3, 64, seed=0)
    assert w.shape == (3, 64)
    assert "Fortune number" in tokenizer.decode(w[0])


def test_local_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("First paragraph here.\n\nSecond paragraph there.\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"json line {i}"}) for i in range(3)) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"body": "alpha"}, {"body": "beta"}]))
    docs, used = load_documents(str(tmp_path / "a.txt"))
    assert docs == ["First paragraph here.", "Second paragraph there."] and used.endswith("a.txt")
    assert load_documents(str(tmp_path / "b.jsonl"))[0] == ["json line 0", "json line 1", "json line 2"]
    assert load_documents(str(tmp_path / "c.json"), text_field="body")[0] == ["alpha", "beta"]
    with pytest.raises(CalibrationDataError, match="'text'"):
        load_documents(str(tmp_path / "c.json"))
    (tmp_path / "c.json").unlink()
    folder_docs, _ = load_documents(str(tmp_path))
    assert folder_docs == [
        "First paragraph here.",
        "Second paragraph there.",
        "json line 0",
        "json line 1",
        "json line 2",
    ]


def test_hf_dataset_builder_from_local_files(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"row {i}"}) for i in range(5)) + "\n")
    docs, used = load_documents("json", data_files=str(path), text_field="content", split="train")
    assert docs == [f"row {i}" for i in range(5)] and used == "dataset:json"
    with pytest.raises(CalibrationDataError, match="no column 'text'"):
        load_documents("json", data_files=str(path), split="train")


def test_list_of_strings():
    docs, used = load_documents(["one", "two"])
    assert docs == ["one", "two"] and "2 strings" in used


def test_builtin_wikipedia_in_file_order():
    docs, used = load_documents("wikipedia")
    assert used == "wikipedia" and len(docs) > 9000
    assert docs[0].startswith("20th-century classical music")
    tail, used_tail = load_documents("wikipedia-tail")
    assert tail == docs[len(docs) // 2 :] and used_tail == "wikipedia-tail"


def test_fortunes_or_documented_fallback():
    docs, used = load_documents("fortunes")
    assert used in ("fortunes", "wikipedia-tail")
    assert len(docs) > 1000


def test_evaluation_prefix_tokens_equal_whole_text_tokens(tokenizer, calib_texts):
    whole = evaluation_tokens(calib_texts, tokenizer)
    prefix = evaluation_tokens(calib_texts, tokenizer, max_tokens=3000)
    assert prefix.numel() >= 3000 and torch.equal(prefix[:3000], whole[:3000])
