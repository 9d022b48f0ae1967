"""Token stores (:mod:`usaf.data.store`): the same examples, statistics, split, batches and digests as the
in-memory loader, for every row kind, ``.txt`` files and directories; atomic, checked (at open, and block by
block as read), rebuilt when bad; the data digest reused while the files' stat is unchanged."""

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


def _entries(root: Path) -> list[Path]:
    """What ``root`` holds besides the data digest cache."""
    return [p for p in root.iterdir() if p.name != store_mod._DIGESTS]


def _only_store(root: Path) -> Path:
    entries = _entries(root)
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    return entries[0]


def test_damaged_store_is_rebuilt(tok, tmp_path, caplog):
    path = _datasets(tmp_path)["prompt_completion"]
    root = tmp_path / "stores"
    ref = _pairs(load_stored(path, tok, 32, root=root, progress=False).examples)
    store = _only_store(root)
    damages = [
        lambda: (store / "ids.bin").write_bytes((store / "ids.bin").read_bytes()[:-4]),  # truncated
        lambda: (store / "offsets.bin").write_bytes(b"\x01" + (store / "offsets.bin").read_bytes()[1:]),  # a byte
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
    assert _entries(root) == []
    monkeypatch.undo()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(DataError, match="line 2"):
        load_stored(bad, tok, 16, root=root, progress=False)
    assert _entries(root) == []
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
    assert len(_entries(root)) == 4


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


def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["ids.bin", "labels.bin"])
def test_corrupted_block_is_found_when_read(tok, tmp_path, monkeypatch, caplog, name):
    """Opening does not hash the token files: a damaged block is found when a sequence in it is read; the
    store is removed with a one-line error (exit 2 from the CLI) and the next run tokenizes again."""
    from usaf.cli import _error_line

    monkeypatch.setattr(store_mod, "_BLOCK_BYTES", 256)
    path = _datasets(tmp_path)["prompt_completion"]
    root = tmp_path / "stores"
    ref = _pairs(load_stored(path, tok, 32, root=root, progress=False).examples)
    store = _only_store(root)
    info = json.loads((store / "manifest.json").read_text())["files"][name]
    assert info["block_bytes"] == 256 and len(info["blocks"]) == -(-info["bytes"] // 256) > 4
    # the middle of the file: a sequence lying in block k
    data = load_stored(path, tok, 32, root=root, progress=False)
    offsets = data.store.offsets
    k = len(info["blocks"]) // 2
    i = int(np.searchsorted(offsets, k * 256 // 4, side="right")) - 1
    _flip(store / name, 4 * int(offsets[i]) + 1)
    monkeypatch.setattr(store_mod, "read_data", _fail)
    data = load_stored(path, tok, 32, root=root, progress=False)  # opens: no block is read
    checked = data.store._checks[data.store._ids.fileno()][4]
    assert sum(checked) == 0
    assert _pairs([data.examples[0]]) == ref[:1]  # the first blocks are fine
    assert 0 < sum(checked) < len(checked)
    with pytest.raises(store_mod.StoreCorrupted) as err:
        data.examples[i]
    msg = str(err.value)
    assert str(store) in msg and "corrupted" in msg and name in msg and "tokenizes the data again" in msg
    assert isinstance(err.value, DataError) and _error_line(err.value) == msg and "\n" not in msg
    assert _entries(root) == []  # removed, nothing left aside
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="usaf"):
        again = load_stored(path, tok, 32, root=root, progress=False)
    assert "tokenizing" in caplog.text
    assert _pairs(again.examples) == ref and _only_store(root) == store


def test_blocks_are_checked_once_and_digests_read_them(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_BLOCK_BYTES", 64)
    path = _datasets(tmp_path)["tokens"]
    root = tmp_path / "s"
    ref, _ = load_examples(path, tok, 32)
    data = load_stored(path, tok, 32, root=root, progress=False)
    hashed = []
    real = store_mod.TokenStore._pread

    def pread(self, f, n, at):
        hashed.append(n)
        return real(self, f, n, at)

    monkeypatch.setattr(store_mod.TokenStore, "_pread", pread)
    first = _pairs(data.examples)
    n_blocks = len(data.store.manifest["files"]["ids.bin"]["blocks"])
    reads = len(hashed)
    assert first == _pairs(ref) and reads >= len(ref) + n_blocks
    assert _pairs(data.examples) == first and len(hashed) - reads == 2 * len(ref)  # no block hashed again
    # a whole-store digest reads (and so checks) every block
    fresh = load_stored(path, tok, 32, root=root, progress=False)
    assert tokens_digest(fresh.examples, []) == tokens_digest(ref, [])  # from the manifest
    assert tokens_digest(fresh.examples, [ref[0]]) == tokens_digest(ref, [ref[0]])
    assert all(all(c[4]) for c in fresh.store._checks.values())
    # pickled (a data-loader worker): its own checks
    again = pickle.loads(pickle.dumps(fresh.examples))
    assert sum(again.store._checks[again.store._ids.fileno()][4]) == 0 and _pairs(again) == first


def test_store_without_block_checksums_is_checked_whole_and_given_them(tok, tmp_path, monkeypatch, caplog):
    path = _datasets(tmp_path)["prompt_completion"]
    root = tmp_path / "stores"
    ref = _pairs(load_stored(path, tok, 32, root=root, progress=False).examples)
    store = _only_store(root)
    m = json.loads((store / "manifest.json").read_text())
    for info in m["files"].values():
        info.pop("block_bytes", None)
        info.pop("blocks", None)
    (store / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(store_mod, "read_data", _fail)
    data = load_stored(path, tok, 32, root=root, progress=False)
    assert all(all(c[4]) for c in data.store._checks.values())  # checked whole
    assert _pairs(data.examples) == ref
    again = json.loads((store / "manifest.json").read_text())
    assert again["files"]["ids.bin"]["blocks"] and again["files"]["labels.bin"]["blocks"]
    assert again["files"]["ids.bin"]["sha256"] == m["files"]["ids.bin"]["sha256"]
    # such a store with a damaged byte is rebuilt when opened, as before
    (store / "manifest.json").write_text(json.dumps(m))
    _flip(store / "ids.bin", 5)
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="usaf"):
        rebuilt = load_stored(path, tok, 32, root=root, progress=False)
    assert "fails its checksum" in caplog.text and _pairs(rebuilt.examples) == ref


def test_data_digest_is_reused_while_the_files_stat_is_unchanged(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_SETTLED_NS", 0)
    data = _datasets(tmp_path)
    path, root = data["text"], tmp_path / "stores"
    calls = []
    real = store_mod.files_digest

    def counting(files):
        calls.append(list(files))
        return real(files)

    monkeypatch.setattr(store_mod, "files_digest", counting)
    a = load_stored(path, tok, 16, root=root, progress=False)
    assert len(calls) == 1 and a.digest == real([path])
    cache = json.loads((root / store_mod._DIGESTS).read_text())
    assert list(cache["entries"].values())[0]["digest"] == a.digest
    b = load_stored(path, tok, 16, root=root, progress=False)
    assert len(calls) == 1 and b.digest == a.digest and b.store.directory == a.store.directory  # not read
    # any change of the stat hashes again: a touch ...
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    c = load_stored(path, tok, 16, root=root, progress=False)
    assert len(calls) == 2 and c.digest == a.digest
    # ... new bytes of the same size, the mtime put back (the ctime changes) ...
    st = path.stat()
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"the", b"tha", 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    d = load_stored(path, tok, 16, root=root, progress=False)
    assert len(calls) == 3 and d.digest != a.digest and d.store.directory != a.store.directory
    # ... or another file at the path (another inode)
    path.unlink()
    path.write_bytes(raw)
    e = load_stored(path, tok, 16, root=root, progress=False)
    assert len(calls) == 4 and e.digest == a.digest and e.store.directory == a.store.directory
    # a directory is one entry of all its files; a damaged cache is ignored and written again
    load_stored(data["dir"], tok, 16, root=root, progress=False)
    load_stored(data["dir"], tok, 16, root=root, progress=False)
    assert len(calls) == 5 and len(json.loads((root / store_mod._DIGESTS).read_text())["entries"]) == 2
    (root / store_mod._DIGESTS).write_text("{oops")
    assert load_stored(path, tok, 16, root=root, progress=False).digest == a.digest and len(calls) == 6
    assert load_stored(path, tok, 16, root=root, progress=False).digest == a.digest and len(calls) == 6
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_data_digest_of_files_just_written_is_not_recorded(tok, tmp_path, monkeypatch):
    """A file changed within the last seconds could change again within the same timestamp tick."""
    monkeypatch.setattr(store_mod, "_SETTLED_NS", 3600 * 10**9)
    path, root = _datasets(tmp_path)["tokens"], tmp_path / "stores"
    load_stored(path, tok, 32, root=root, progress=False)
    assert not (root / store_mod._DIGESTS).exists()


def test_digest_of_whole_stores_is_computed_once(tok, tmp_path, monkeypatch):
    """A run with --eval-data: the tokens digest of both whole stores is recorded under their keys."""
    data = _datasets(tmp_path)
    root = tmp_path / "stores"
    train = load_stored(data["text"], tok, 16, root=root, progress=False).examples
    evals = load_stored(data["tokens"], tok, 16, root=root, progress=False).examples
    ref_train, ref_eval = load_examples(data["text"], tok, 16)[0], load_examples(data["tokens"], tok, 16)[0]
    want = tokens_digest(ref_train, ref_eval)
    assert tokens_digest(train, evals) == want
    monkeypatch.setattr(store_mod.TokenStore, "hash_into", _fail)
    again = load_stored(data["text"], tok, 16, root=root, progress=False).examples
    assert tokens_digest(again, evals) == want  # from digests.json: nothing read
    assert tokens_digest(train, []) == tokens_digest(ref_train, [])  # from the manifest
    with pytest.raises(AssertionError, match="tokenized again"):
        tokens_digest(evals, train)  # another order: another digest, computed
