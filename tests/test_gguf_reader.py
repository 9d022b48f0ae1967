"""The GGUF reader: agrees with gguf.GGUFReader on a good file, and refuses damaged or hostile files (one line,
GGUFError) before allocating anything."""

import struct

import numpy as np
import pytest

from usaf.load.gguf.reader import GGUFError, GGUFFile

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType


def _write(path, tensors):
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(1)
    w.add_array("test.list", [1, 2, 3])
    w.add_string("test.name", "héllo")
    for name, (data, kind) in tensors.items():
        w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def good(tmp_path):
    rng = np.random.default_rng(0)
    return _write(tmp_path / "m.gguf", {
        "a.weight": (rng.standard_normal((2, 3, 64)).astype(np.float32), T.Q8_0),
        "b.weight": (rng.standard_normal((5,)).astype(np.float32), T.F32),
        "c.weight": (rng.standard_normal((4, 32)).astype(np.float32), T.Q4_1),
    })


def test_reader_agrees_with_gguf_package(good):
    f = GGUFFile(good)
    ref = gguf.GGUFReader(str(good))
    assert f.arch == "qwen3moe" and f.get("test.list") == [1, 2, 3] and f.get("test.name") == "héllo"
    assert list(f.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = f.tensors[t.name]
        assert info.shape == tuple(int(x) for x in reversed(t.shape.tolist())) and info.ggml_type == t.tensor_type
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert np.array_equal(f.raw(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))
    assert f.raw("a.weight").shape == (2, 3, 68)


def _patch_dims(path, name: bytes, dims: list[int]):
    raw = bytearray(path.read_bytes())
    at = raw.index(name) + len(name)
    assert struct.unpack_from("<I", raw, at)[0] == len(dims)
    for i, d in enumerate(dims):
        struct.pack_into("<Q", raw, at + 4 + 8 * i, d)
    path.write_bytes(bytes(raw))


def _tensor_field(path, name: bytes, ndims: int) -> int:
    """Byte position of the type field after ``name``'s dims."""
    return path.read_bytes().index(name) + len(name) + 4 + 8 * ndims


@pytest.mark.parametrize("case, match", [
    ("magic", "not a GGUF file"),
    ("truncated", "truncated or corrupt: tensor c.weight"),
    ("header", "truncated or corrupt"),
    ("absurd", "absurd dimensions"),
    ("zero", "absurd dimensions"),
    ("type", "type Q3_K, which usaf does not read"),
    ("offset", "ends past the end of the file"),
    ("overlap", "overlap"),
    ("count", "do not fit"),
    ("string", "runs past the end of the file"),
])
def test_reader_refuses_bad_files(good, case, match):
    raw = bytearray(good.read_bytes())
    if case == "magic":
        raw[:4] = b"GGUX"
    elif case == "truncated":
        raw = raw[:-20]
    elif case == "header":
        raw = raw[:40]
    elif case == "absurd":
        good.write_bytes(raw)
        _patch_dims(good, b"a.weight", [64, 1 << 40, 2])
        raw = bytearray(good.read_bytes())
    elif case == "zero":
        good.write_bytes(raw)
        _patch_dims(good, b"b.weight", [0])
        raw = bytearray(good.read_bytes())
    elif case == "type":
        at = _tensor_field(good, b"b.weight", 1)
        struct.pack_into("<I", raw, at, int(T.Q3_K))
    elif case == "offset":
        at = _tensor_field(good, b"c.weight", 2) + 4
        struct.pack_into("<Q", raw, at, 1 << 40)
    elif case == "overlap":
        at = _tensor_field(good, b"c.weight", 2) + 4
        struct.pack_into("<Q", raw, at, 0)
    elif case == "count":
        struct.pack_into("<Q", raw, 8, 1 << 60)
    elif case == "string":
        at = raw.index(b"test.name") + len(b"test.name") + 4
        struct.pack_into("<Q", raw, at, 1 << 50)
    good.write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match=match):
        GGUFFile(good)


def test_long_arrays_stay_bytes_until_read(tmp_path):
    """A vocabulary-sized array is kept as its span of the file (lengths checked at open, nothing decoded);
    read, it equals the gguf package's; a string length past the end is refused at open."""
    words = [f"tok{i}\u00e9" for i in range(5000)]
    w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "qwen3moe")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", words)
    w.add_array("tokenizer.ggml.token_type", list(range(5000)))
    w.add_tensor("b.weight", np.ones(4, np.float32), raw_dtype=T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "v.gguf")
    toks = f.metadata["tokenizer.ggml.tokens"]
    assert type(toks).__name__ == "LazyArray" and len(toks) == 5000 and toks[4999] == words[4999]
    assert list(toks) == words and toks == words and f.metadata["tokenizer.ggml.token_type"] == list(range(5000))
    assert toks == GGUFFile(tmp_path / "v.gguf").metadata["tokenizer.ggml.tokens"]
    raw = bytearray((tmp_path / "v.gguf").read_bytes())
    at = raw.index(b"tok4999\xc3\xa9") - 8  # the last string's length
    raw[at : at + 8] = struct.pack("<Q", 1 << 40)
    (tmp_path / "bad.gguf").write_bytes(bytes(raw))
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        GGUFFile(tmp_path / "bad.gguf")
