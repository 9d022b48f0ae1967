"""Token stores (:mod:`usaf.data.store`): the same examples, statistics, split, batches and digests as the
in-memory loader, for every row kind, ``.txt`` files and directories; atomic, checked, rebuilt when bad."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from usaf.data import load as load_mod
from usaf.data import store as store_mod
from usaf.data.batches import Batches, split_eval
from usaf.data.examples import IGNORE_INDEX, DataError
from usaf.data.load import load_examples
from usaf.data.store import StoredExamples, load_stored, tokens_digest
from usaf.testing import TINY_CORPUS, make_tiny_tokenizer

WORDS = TINY_CORPUS.split()


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(w + ("\n" if rng.random() < 0.15 else "") for w in words)


def _write_rows(path: Path, rows: list, rng: random.Random) -> Path:
    """JSONL with a blank line here and there and mixed line endings (LF, CRLF, CR)."""
    out = b""
    for row in rows:
        out += json.dumps(row).encode() + rng.choice([b"\n", b"\r\n", b"\r", b"\n\n"])
    path.write_bytes(out)
    return path


def _datasets(root: Path) -> dict[str, Path]:
    rng = random.Random(0)
    out = {}
    out["text"] = _write_rows(root / "text.jsonl", [{"text": _text(rng, 1, 60)} for _ in range(40)], rng)
    pc = [{"prompt": _text(rng, 1, 8), "completion": _text(rng, 1, 30)} for _ in range(30)]
    pc.append({"prompt": _text(rng, 80, 90), "completion": "fine"})  # completion cut away: dropped
    out["prompt_completion"] = _write_rows(root / "pc.jsonl", pc, rng)
    conv = []
    for _ in range(12):
        turns = [{"role": "system", "content": _text(rng, 1, 5)}]
        for _ in range(rng.randint(1, 3)):
            turns += [{"role": "user", "content": _text(rng, 1, 10)},
                      {"role": "assistant", "content": _text(rng, 1, 20)}]
        conv.append({"messages": turns})
    out["messages"] = _write_rows(root / "chat.jsonl", conv, rng)
    toks = []
    for i in range(25):
        ids = [rng.randrange(6, 300) for _ in range(rng.randint(1, 40))]
        row = {"input_ids": ids}
        if i % 2:
            row["labels"] = [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids]
        toks.append(row)
    toks.append({"input_ids": [7, 8, 9], "labels": [IGNORE_INDEX] * 3})  # no loss: dropped
    out["tokens"] = _write_rows(root / "tokens.jsonl", toks, rng)
    out["txt"] = root / "book.txt"
    out["txt"].write_text("\ufeff" + "".join(_text(rng, 5, 40) + "\n" for _ in range(60)), encoding="utf-8")
    d = root / "dir"
    d.mkdir()
    (d / "b.txt").write_text(_text(rng, 100, 300))
    (d / "a.jsonl").write_text("".join(json.dumps({"text": _text(rng, 1, 50)}) + "\n" for _ in range(20)))
    (d / "c.txt").write_text("   \n\n ")  # blank: adds nothing
    (d / ".hidden").write_text("ignored")
    out["dir"] = d
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny read blocks, row chunks, text pieces and write buffers, so every boundary is crossed."""
    monkeypatch.setattr(load_mod, "_READ_BYTES", 61)
    monkeypatch.setattr(load_mod, "_CHUNK_ROWS", 3)
    monkeypatch.setattr(load_mod, "_CHUNK_CHARS", 200)
    monkeypatch.setattr(load_mod, "_TXT_PIECE_CHARS", 97)
    monkeypatch.setattr(store_mod, "_FLUSH_TOKENS", 50)


def _pairs(examples) -> list[tuple[list[int], list[int]]]:
    return [(ex.input_ids, ex.labels) for ex in examples]


@pytest.mark.parametrize("name", ["text", "prompt_completion", "messages", "tokens", "txt", "dir"])
def test_store_gives_the_in_memory_examples(tok, tmp_path, monkeypatch, name):
    seq_len = 160 if name == "messages" else 32
    path = _datasets(tmp_path)[name]
    monkeypatch.setattr(load_mod, "_TXT_PIECE_CHARS", 97)  # the same text pieces on both sides
    ref, ref_stats = load_examples(path, tok, seq_len)  # one block per file, one row chunk
    monkeypatch.setattr(load_mod, "_READ_BYTES", 61)
    monkeypatch.setattr(load_mod, "_CHUNK_ROWS", 3)
    monkeypatch.setattr(load_mod, "_CHUNK_CHARS", 200)
    monkeypatch.setattr(store_mod, "_FLUSH_TOKENS", 50)
    root = tmp_path / "stores"
    data = load_stored(path, tok, seq_len, root=root, progress=False)
    assert isinstance(data.examples, StoredExamples) and data.store is not None
    assert len(ref) > 4
    assert _pairs(data.examples) == _pairs(ref)
    assert data.stats == ref_stats
    if name in ("prompt_completion", "tokens"):
        assert ref_stats.dropped >= 1
    # the held-out split, and the batches of the rest: 2 ranks taking turns, across epochs
    for seed in (0, 3):
        tr_ref, ev_ref = split_eval(ref, fraction=0.1, seed=seed, max_eval=64)
        tr, ev = split_eval(data.examples, fraction=0.1, seed=seed, max_eval=64)
        assert isinstance(tr, StoredExamples) and isinstance(ev, StoredExamples)
        assert _pairs(tr) == _pairs(tr_ref) and _pairs(ev) == _pairs(ev_ref)
        for rank in (0, 1):
            a = Batches(tr_ref, 4, seed=seed, rank=rank, world_size=2, pad_id=0)
            b = Batches(tr, 4, seed=seed, rank=rank, world_size=2, pad_id=0)
            for _ in range(3 * len(a)):
                x, y = a.next_batch(), b.next_batch()
                assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
            assert a.state_dict() == b.state_dict()
        # identities: what a run records for resume
        assert tokens_digest(data.examples, []) == tokens_digest(ref, [])
        assert tokens_digest(data.examples, ev) == tokens_digest(ref, ev_ref)
    # slices are views
    assert _pairs(data.examples[2:5]) == _pairs(ref[2:5])
    # a second load opens the store: nothing is tokenized
    monkeypatch.setattr(store_mod, "read_data", _fail)
    again = load_stored(path, tok, seq_len, root=root, progress=False)
    assert again.store.directory == data.store.directory and _pairs(again.examples) == _pairs(ref)
    assert again.stats == ref_stats


def _fail(*args, **kwargs):
    raise AssertionError("tokenized again")


def test_streamed_txt_pieces_match_the_whole_text_cut(tok, tmp_path, monkeypatch):
    """The text pieces read block by block are those the whole text is cut into (the pieces are tokenized
    separately, so they must not move)."""

    def whole_cut(text: str, size: int):
        start = 0
        while start < len(text):
            end = start + size
            if end < len(text):
                cut = text.rfind("\n", start, end)
                if cut > start:
                    end = cut + 1
            yield text[start:end]
            start = end

    rng = random.Random(1)
    text = "é" + "".join(_text(rng, 1, 30) + ("\n" if rng.random() < 0.5 else "") for _ in range(200))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    loader = load_mod._Loader(tok, 16, {}, load_mod.ListSink())
    for block, piece in [(7, 50), (61, 97), (1 << 20, 97), (13, 1 << 20)]:
        monkeypatch.setattr(load_mod, "_READ_BYTES", block)
        monkeypatch.setattr(load_mod, "_TXT_PIECE_CHARS", piece)
        assert list(loader._txt_pieces(path)) == list(whole_cut(text, piece))


def test_jsonl_lines_split_as_bytes_splitlines(tmp_path, monkeypatch):
    raw = b'{"a": 1}\r\n\r{"b": 2}\r\r\n\n{"c": 3}\r'
    path = tmp_path / "x.jsonl"
    path.write_bytes(raw)
    for block in (1, 2, 3, 5, 100):
        monkeypatch.setattr(load_mod, "_READ_BYTES", block)
        assert list(load_mod._lines(path, None)) == raw.splitlines()


def _only_store(root: Path) -> Path:
    entries = [p for p in root.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    return entries[0]


def test_damaged_store_is_rebuilt(tok, tmp_path, caplog):
    path = _datasets(tmp_path)["prompt_completion"]
    root = tmp_path / "stores"
    ref = _pairs(load_stored(path, tok, 32, root=root, progress=False).examples)
    store = _only_store(root)
    damages = [
        lambda: (store / "ids.bin").write_bytes((store / "ids.bin").read_bytes()[:-4]),  # truncated
        lambda: (store / "labels.bin").write_bytes(b"\x01" + (store / "labels.bin").read_bytes()[1:]),  # a byte
        lambda: (store / "manifest.json").write_text("{not json"),
        lambda: (store / "offsets.bin").unlink(),
        lambda: (store / "manifest.json").unlink(),
    ]
    for damage in damages:
        damage()
        with caplog.at_level(logging.INFO, logger="usaf"):
            again = load_stored(path, tok, 32, root=root, progress=False)
        assert _pairs(again.examples) == ref
        assert _only_store(root) == store
        assert "tokenizing" in caplog.text
        caplog.clear()


def test_interrupted_or_failed_build_leaves_no_store(tok, tmp_path, monkeypatch):
    data = _datasets(tmp_path)
    root = tmp_path / "stores"

    class Interrupted(BaseException):
        pass

    real = store_mod._Writer.add
    calls = []

    def add(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise Interrupted
        return real(self, *args)

    monkeypatch.setattr(store_mod._Writer, "add", add)
    with pytest.raises(Interrupted):
        load_stored(data["text"], tok, 16, root=root, progress=False)
    assert list(root.iterdir()) == []
    monkeypatch.undo()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(DataError, match="line 2"):
        load_stored(bad, tok, 16, root=root, progress=False)
    assert list(root.iterdir()) == []
    # a stale temporary directory of a dead build is cleared by the next build
    stale = root / ".deadbeef.x.tmp"
    stale.mkdir()
    (stale / "ids.bin").write_bytes(b"1234")
    old = 1_000_000_000
    os.utime(stale / "ids.bin", (old, old))
    os.utime(stale, (old, old))
    load_stored(data["text"], tok, 16, root=root, progress=False)
    assert not stale.exists() and _only_store(root)


def test_store_key_follows_content_and_settings(tok, tmp_path):
    data = _datasets(tmp_path)
    root = tmp_path / "stores"
    a = load_stored(data["text"], tok, 16, root=root, progress=False)
    copy = tmp_path / "elsewhere" / "same.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data["text"].read_bytes())
    b = load_stored(copy, tok, 16, root=root, progress=False)
    assert b.store.directory == a.store.directory and b.digest == a.digest  # by content, not path
    assert b.stats.files == [str(copy)]
    c = load_stored(data["text"], tok, 24, root=root, progress=False)
    assert c.store.directory != a.store.directory
    other = make_tiny_tokenizer(vocab_size=400)
    d = load_stored(data["text"], other, 16, root=root, progress=False)
    assert d.store.directory != a.store.directory
    same_bytes_as_txt = tmp_path / "rows.txt"
    same_bytes_as_txt.write_bytes(data["text"].read_bytes())
    e = load_stored(same_bytes_as_txt, tok, 16, root=root, progress=False)
    assert e.store.directory != a.store.directory and e.stats.rows == 1
    assert len(list(root.iterdir())) == 4


def test_unwritable_cache_falls_back_to_memory(tok, tmp_path, caplog):
    path = _datasets(tmp_path)["tokens"]
    blocker = tmp_path / "file"
    blocker.write_text("")  # the cache root is a file: no directory can be made there
    with caplog.at_level(logging.WARNING, logger="usaf"):
        data = load_stored(path, tok, 32, root=blocker / "stores", progress=False)
    assert data.store is None and isinstance(data.examples, list)
    assert _pairs(data.examples) == _pairs(load_examples(path, tok, 32)[0])
    assert "in memory" in caplog.text


def test_stored_examples_pickle_and_take(tok, tmp_path):
    path = _datasets(tmp_path)["tokens"]
    data = load_stored(path, tok, 32, root=tmp_path / "s", progress=False)
    view = data.examples.take(np.array([3, 1, 4]))
    assert _pairs(view) == [_pairs(data.examples)[i] for i in (3, 1, 4)]
    again = pickle.loads(pickle.dumps(view))
    assert _pairs(again) == _pairs(view)
