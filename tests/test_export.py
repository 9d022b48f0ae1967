"""usaf export / apply: hf checkpoints in the source's own layout, revertible delta files, GGUF for llama.cpp."""

import filecmp
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

import usaf
from usaf.cli import main
from usaf.export.layout import load_run
from usaf.load.hf import load_model
from usaf.testing import (
    FAMILIES,
    PER_EXPERT_FAMILIES,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_checkpoint,
)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _train(ckpt: Path, out: Path, dtype=torch.float32, quant="4bit", train_layers="all", steps=3) -> Path:
    """A few real training steps through the Python API; writes a run directory like `usaf train` does."""
    model = load_model(str(ckpt), dtype=dtype)
    handle = usaf.prepare(model, usaf.UsafConfig(density=0.05, quant=quant, train_layers=train_layers))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        ids = torch.randint(6, model.config.vocab_size, (4, 24), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    usaf.select(handle, batches[:2])
    opt = usaf.UsafOptimizer(handle, lr=0.02, router_lr=0.01)
    model.train()
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    out.mkdir(parents=True)
    handle.save_delta(out / "delta.safetensors", steps=steps)
    (out / "config.yaml").write_text(yaml.safe_dump({"model": str(ckpt), "dtype": DTYPE_NAMES[dtype]}))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """qwen3_moe trained in bf16 on its top layer only; mixtral in fp32 on all layers. Both 4-bit, sharded."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family, dtype, layers in (("qwen3_moe", torch.bfloat16, "top:1"), ("mixtral", torch.float32, "all")):
        ckpt = save_tiny_checkpoint(family, root / family / "ckpt", per_expert=True, max_shard_size="30KB")
        out[family] = (ckpt, _train(ckpt, root / family / "run", dtype, train_layers=layers))
    return out


@pytest.fixture(scope="module")
def hf_exports(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, (_, run) in runs.items():
        assert main(["export", str(run), "--format", "hf", "--out", str(root / family)]) == 0
        out[family] = root / family
    return out


def _tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = (f.name, s.get_tensor(k))
    return out


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) \
        if a.numel() else a.shape == b.shape


def _merged_logits(ckpt: Path, delta: Path, ids: torch.Tensor, quant="none", dtype=torch.float32):
    """usaf's own in-memory model with the delta loaded (the reference an export must reproduce)."""
    meta = load_run(delta, base=str(ckpt)).meta
    handle = usaf.prepare(load_model(str(ckpt), dtype=dtype),
                          usaf.UsafConfig(quant=quant, train_layers=meta["train_layers"]))
    handle.load_delta(delta, check_fingerprint=False)
    with torch.no_grad():
        return handle.model(input_ids=ids).logits.float()


IDS = torch.tensor([[5, 17, 99, 250, 3, 42, 7, 300, 11, 64], [200, 1, 33, 8, 150, 77, 260, 19, 4, 90]])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_export_hf_same_layout_and_logits(runs, hf_exports, family):
    from transformers import AutoModelForCausalLM

    ckpt, run = runs[family]
    out = hf_exports[family]
    got = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        logits = got(input_ids=IDS).logits
    want = _merged_logits(ckpt, run / "delta.safetensors", IDS)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    with torch.no_grad():
        assert (base(input_ids=IDS).logits - want).abs().max() > 1e-3  # the delta is really there

    src, dst = _tensors(ckpt), _tensors(out)
    assert set(src) == set(dst)
    assert all(src[k][0] == dst[k][0] and src[k][1].dtype == dst[k][1].dtype and
               src[k][1].shape == dst[k][1].shape for k in src)  # names, shard map, dtypes, shapes
    assert (ckpt / "model.safetensors.index.json").read_bytes() == (out / "model.safetensors.index.json").read_bytes()
    changed = {k for k in src if not _same_bytes(src[k][1], dst[k][1])}
    expert_key = ".block_sparse_moe.experts." if family == "mixtral" else ".mlp.experts."
    assert changed and all(expert_key in k or k.endswith(("mlp.gate.weight", "moe.gate.weight")) for k in changed)
    if family == "qwen3_moe":  # trained top:1 -> layer 0 untouched
        assert not any(k.startswith("model.layers.0.") for k in changed)
    # touched tensors differ only at a few positions (sparse delta), routers anywhere
    for k in changed:
        if "experts" in k:
            assert int((src[k][1] != dst[k][1]).sum()) < src[k][1].numel() // 4
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja"):
        if (ckpt / f).exists():
            assert filecmp.cmp(ckpt / f, out / f, shallow=False), f
    assert json.loads((out / "usaf_export.json").read_text())["base_weights"] == "full"


def test_export_hf_dequantized_base_weights(runs, tmp_path):
    """--base-weights dequantized writes exactly the expert weights training saw (4-bit base + delta, bf16)."""
    ckpt, run = runs["qwen3_moe"]
    out = tmp_path / "deq"
    assert main(["export", str(run), "--out", str(out), "--base-weights", "dequantized"]) == 0
    model = load_model(str(ckpt), dtype=torch.bfloat16)  # as training loaded it
    handle = usaf.prepare(model, usaf.UsafConfig(quant="4bit", train_layers="top:1"))
    handle.load_delta(run / "delta.safetensors")  # same dtype as training: the fingerprint matches
    disk = _tensors(out)
    for m in handle.layers:
        eff = m.experts.weight("gate_up_proj", 0, 8, torch.bfloat16, "cpu")
        inter = eff.shape[1] // 2
        for e in range(8):
            gate = disk[f"{m.prefix}.{e}.gate_proj.weight"][1]
            assert gate.dtype == torch.float32 and torch.equal(gate, eff[e, :inter].float())
            assert torch.equal(disk[f"{m.prefix}.{e}.up_proj.weight"][1], eff[e, inter:].float())
        down = m.experts.weight("down_proj", 0, 8, torch.bfloat16, "cpu")
        assert torch.equal(disk[f"{m.prefix}.3.down_proj.weight"][1], down[3].float())


def test_delta_file_apply_revert_roundtrip(runs, hf_exports, tmp_path, capsys):
    ckpt, run = runs["mixtral"]
    delta = tmp_path / "d.safetensors"
    assert main(["export", str(run), "--format", "delta", "--out", str(delta)]) == 0
    assert "MB per million active elements" in capsys.readouterr().out
    with safe_open(str(delta), "pt") as f:
        meta = f.metadata()
    assert meta["base_fingerprint"] == load_run(run).meta["base_fingerprint"] and meta["revertible"] == "1"

    merged, back = tmp_path / "merged", tmp_path / "back"
    assert main(["apply", "--model", str(ckpt), "--delta", str(delta), "--out", str(merged)]) == 0
    a, b = _tensors(merged), _tensors(hf_exports["mixtral"])
    assert set(a) == set(b) and all(_same_bytes(a[k][1], b[k][1]) for k in a)  # apply == export hf
    assert main(["apply", "--model", str(merged), "--delta", str(delta), "--out", str(back), "--revert"]) == 0
    for f in sorted(p.name for p in ckpt.iterdir()):  # every file byte-identical to the original
        assert filecmp.cmp(ckpt / f, back / f, shallow=False), f
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in ckpt.iterdir())

    capsys.readouterr()
    assert main(["apply", "--model", str(merged), "--delta", str(delta), "--out", str(tmp_path / "x")]) == 2
    assert main(["apply", "--model", str(ckpt), "--delta", str(delta), "--out", str(tmp_path / "y"),
                 "--revert"]) == 2
    assert main(["apply", "--model", str(ckpt), "--delta", str(run / "delta.safetensors"), "--out",
                 str(tmp_path / "z"), "--revert"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("usaf: error: ") for e in err)
    assert "not the base this delta was made for" in err[0] and "does not contain this delta" in err[1]
    assert "no original values" in err[2]
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_wrong_base_refused(runs, tmp_path, capsys):
    ckpt, run = runs["mixtral"]
    other = save_tiny_checkpoint("mixtral", tmp_path / "other", seed=1, per_expert=True, max_shard_size="30KB")
    delta = tmp_path / "d.safetensors"
    assert main(["export", str(run), "--format", "delta", "--out", str(delta)]) == 0
    capsys.readouterr()
    cmds = [["export", str(run / "delta.safetensors"), "--base", str(other), "--out", str(tmp_path / "a")],
            ["apply", "--model", str(other), "--delta", str(run / "delta.safetensors"), "--out", str(tmp_path / "b")],
            ["apply", "--model", str(other), "--delta", str(delta), "--out", str(tmp_path / "c")],
            ["export", str(run), "--base", str(runs["qwen3_moe"][0]), "--out", str(tmp_path / "d")]]
    for cmd in cmds:
        assert main(cmd) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(e.startswith("usaf: error: ") for e in err)
    assert "another base model" in err[0] and "another base model" in err[1]
    assert "not the base this delta was made for" in err[2] and "qwen3_moe" in err[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "other"]  # nothing half-written


def test_failed_check_removes_output(runs, tmp_path, monkeypatch, capsys):
    import usaf.export.hf as ex

    ckpt, run = runs["mixtral"]
    real = ex.merged_values
    monkeypatch.setattr(ex, "merged_values", lambda o, v: real(o, v * 1.5))  # a wrong merge
    assert main(["export", str(run), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("usaf: error: check failed") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


# Every family through the command line, as a new user runs it: train a few steps on a `save_pretrained`
# checkpoint (per-expert on-disk layouts where published checkpoints use them, sharded), then `usaf export
# --format hf` (its own reload check compares transformers' logits with usaf's merged model), `--format delta`,
# `usaf apply` (== the hf export, byte for byte; its own reload check is tested above) and `usaf apply --revert` (== the source, every file byte for
# byte). deepseek_v3 / glm4_moe keep fp32 routers in a bf16 model: the fingerprint must not depend on that.
ROUNDTRIP = [(f, "4bit" if i % 2 else "none") for i, f in enumerate(FAMILIES)]
ROUNDTRIP += [(f, q) for f in ("deepseek_v3", "glm4_moe") for q in ("none", "4bit") if (f, q) not in ROUNDTRIP]
# Families found in the module tree, with no row (tests/test_families.py has the numerics of all of them): MLA
# attention with dense first layers, a transposed layout, a router named `router`, a hybrid of mamba and attention
# layers.
ROUNDTRIP += [("deepseek_v2", "none"), ("aria_text", "4bit"), ("phimoe", "none"), ("jamba", "4bit")]
# Routers that also score null experts: longcat_flash's identity zero experts (and gate_up_proj rows for them),
# zaya's skip expert scored by a router MLP.
ROUNDTRIP += [("longcat_flash", "none"), ("zaya", "4bit")]
# Experts without a gate (nemotron_h: up_proj + relu2, published per-expert layout under `backbone.`), dbrx's 2-D
# w1 / v1 / w2 tensors (written back under their own names and shapes) and jetmoe's stacks held by its MoE block
# (input_linear.weight / output_linear.weight).
ROUNDTRIP += [("nemotron_h", "4bit"), ("dbrx", "none"), ("jetmoe", "4bit")]
# Vision-language models whose text decoder is no CausalLM: loaded whole with their image-text-to-text class,
# trained on text; the export keeps every tensor name (vision tower included) and loads with that class.
# ernie4_5_vl_moe has modality-isolated experts (text experts train, vision experts stay frozen); muse_spark a
# norm after each expert and experts on a projection of the hidden states.
VISION_LANGUAGE = {"qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
                   "ernie4_5_vl_moe": "Ernie4_5_VLMoeForConditionalGeneration",
                   "muse_spark": "MuseSparkForConditionalGeneration"}
ROUNDTRIP += [("qwen3_vl_moe", "none"), ("ernie4_5_vl_moe", "4bit"), ("muse_spark", "4bit")]


@pytest.mark.parametrize("family,quant", ROUNDTRIP)
def test_train_export_apply_revert_every_family(family, quant, tmp_path, capsys):
    src, dst = _roundtrip(family, quant, tmp_path, capsys)
    if family in VISION_LANGUAGE:  # the export loads with the model's own class; only text-decoder tensors changed
        model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf"))
        assert type(model).__name__ == VISION_LANGUAGE[family]
        changed = [k for k in src if not _same_bytes(src[k][1], dst[k][1])]
        assert changed and all(k.startswith("model.language_model.layers.") for k in changed), changed
        assert all("vision_moe" not in k for k in changed)  # ernie's vision experts never see text tokens


@pytest.mark.parametrize("family", ["deepseek_ocr2", "unlimited_ocr"])
def test_vision_language_checkpoint_in_its_original_layout(family, tmp_path, capsys, caplog):
    """A vision-language model as plain ``save_pretrained`` writes it: the text decoder under ``model.layers``
    (in memory ``model.language_model.layers``), experts per expert; unlimited_ocr's vision attention merges
    q/k/v into one tensor, so the streamed loader falls back to transformers' from_pretrained. Export and
    apply find the renamed tensors through transformers' conversion tables and keep the source's names;
    revert is byte-exact."""
    src, dst = _roundtrip(family, "4bit", tmp_path, capsys, original=True)
    fell_back = "loaded with from_pretrained instead of streamed" in caplog.text
    assert fell_back == (family == "unlimited_ocr")
    changed = [k for k in src if not _same_bytes(src[k][1], dst[k][1])]
    assert changed and all(k.startswith("model.layers.") for k in changed), changed
    assert any(".mlp.experts.0." in k for k in changed)  # per-expert tensors on disk


# Sparse deltas on the attention projections too (--attention-density): the same round trip, and the export
# changes attention tensors. MLA attention (deepseek_v2) has other projection names.
@pytest.mark.parametrize("family,quant", [("qwen3_moe", "4bit"), ("mixtral", "none"), ("deepseek_v2", "none")])
def test_attention_deltas_export_apply_revert(family, quant, tmp_path, capsys, monkeypatch):
    src, dst = _roundtrip(family, quant, tmp_path, capsys, ["--attention-density", "0.1"])
    changed = [k for k in src if not _same_bytes(src[k][1], dst[k][1])]
    assert any("attn" in k for k in changed), changed
    if family in ("qwen3_moe", "mixtral"):  # GGUF: the merged attention output projection, as in the hf export
        gguf = pytest.importorskip("gguf")
        import usaf.export.gguf as ge

        monkeypatch.setattr(ge, "have_llama_cpp", lambda: False)
        out = tmp_path / "m.gguf"
        assert main(["export", str(tmp_path / "run"), "--format", "gguf", "--type", "f16", "--out", str(out)]) == 0
        tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
        for i in range(2):
            name = f"model.layers.{i}.self_attn.o_proj.weight"
            want = dst[name][1].to(torch.float16)
            got = torch.from_numpy(tensors[f"blk.{i}.attn_output.weight"].data.copy()).reshape(want.shape)
            assert torch.equal(got, want), name
        assert any("self_attn.o_proj" in k for k in changed)


# Sparse deltas on the shared experts' linears too (--shared-density): qwen2_moe's mlp.shared_expert.*, deepseek's
# mlp.shared_experts.*; the same round trip (hf export == apply, revert byte-exact, the hf export's logits
# within 1e-5 of the in-memory model's), and the export changes shared-expert tensors.
@pytest.mark.parametrize("family,quant", [("qwen2_moe", "4bit"), ("deepseek_v3", "none")])
def test_shared_deltas_export_apply_revert(family, quant, tmp_path, capsys):
    src, dst = _roundtrip(family, quant, tmp_path, capsys, ["--shared-density", "0.1"])
    changed = [k for k in src if not _same_bytes(src[k][1], dst[k][1])]
    shared = [k for k in changed if ".shared_expert" in k]
    assert shared and all(k.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")) for k in shared)
    assert not any("shared_expert_gate" in k or "self_attn" in k for k in changed), changed


def _roundtrip(family, quant, tmp_path, capsys, extra=(), original=False):
    if original:  # plain save_pretrained: transformers' original (published) layout and names
        ckpt = tmp_path / "ckpt"
        model = make_tiny_model(family)
        model.save_pretrained(ckpt, max_shard_size="40KB")
        make_tiny_tokenizer(model.config.get_text_config().vocab_size).save_pretrained(ckpt)
    else:
        ckpt = save_tiny_checkpoint(family, tmp_path / "ckpt", per_expert=family in PER_EXPERT_FAMILIES,
                                    max_shard_size="40KB")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} fox {w} dog {i} " * 3}) + "\n"
                            for i, w in enumerate("abcdefghijkl")))
    run = tmp_path / "run"
    assert main(["train", "--model", str(ckpt), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--seq-len", "16", "--batch-size", "4", "--lr", "0.05", "--density", "0.1", "--quant", quant,
                 "--train-layers", "all", "--calib-batches", "1", "--quiet", *extra]) == 0
    hf, delta, merged, back = tmp_path / "hf", tmp_path / "d.safetensors", tmp_path / "merged", tmp_path / "back"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(hf)]) == 0
    err = float(re.search(r"max rel. logit error ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert err < 1e-5
    assert main(["export", str(run), "--format", "delta", "--out", str(delta)]) == 0
    assert main(["apply", "--model", str(ckpt), "--delta", str(delta), "--out", str(merged), "--no-check"]) == 0
    assert main(["apply", "--model", str(merged), "--delta", str(delta), "--out", str(back), "--revert"]) == 0
    src, dst, app = _tensors(ckpt), _tensors(hf), _tensors(merged)
    assert {k: (v[0], v[1].dtype, v[1].shape) for k, v in src.items()} == \
        {k: (v[0], v[1].dtype, v[1].shape) for k, v in dst.items()}  # names, shards, dtypes, shapes
    assert any(not _same_bytes(src[k][1], dst[k][1]) for k in src)  # the delta is in the export
    assert set(app) == set(dst) and all(_same_bytes(app[k][1], dst[k][1]) for k in app)  # apply == export hf
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    for f in sorted(p.name for p in ckpt.iterdir()):  # revert: every file byte-identical to the original
        assert filecmp.cmp(ckpt / f, back / f, shallow=False), f
    return src, dst



def test_train_and_export_keep_no_generation_cache(tmp_path, capsys):
    """usaf's forwards run without a generation cache: a jamba of mamba layers only (no attention layer, whose
    cache transformers cannot size) trains and exports through the command line."""
    ckpt = save_tiny_checkpoint("jamba", tmp_path / "ckpt", attn_layer_period=4, attn_layer_offset=3)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} fox {w} dog {i} " * 3}) + "\n" for i, w in enumerate("abcdef")))
    run = tmp_path / "run"
    assert main(["train", "--model", str(ckpt), "--data", str(data), "--out", str(run), "--steps", "2",
                 "--seq-len", "16", "--batch-size", "4", "--density", "0.1", "--quant", "none",
                 "--train-layers", "all", "--calib-batches", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "reload check ok" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_gguf_written_and_read_back(runs, tmp_path, family, monkeypatch):
    """Without llama.cpp: names, shapes, hyper-parameters and tokenizer metadata as llama.cpp expects them."""
    gguf = pytest.importorskip("gguf")
    import usaf.export.gguf as ge

    monkeypatch.setattr(ge, "have_llama_cpp", lambda: False)
    ckpt, run = runs[family]
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    r = gguf.GGUFReader(str(out))
    arch = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}[family]

    def field(name):
        f = r.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("general.architecture") == arch
    assert field(f"{arch}.expert_count") == 8 and field(f"{arch}.expert_used_count") == 2
    assert field(f"{arch}.block_count") == 2 and field(f"{arch}.embedding_length") == 64
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert len(field("tokenizer.ggml.tokens")) == 320 and len(field("tokenizer.ggml.merges")) > 0
    assert field("tokenizer.ggml.eos_token_id") == 3 and "im_start" in field("tokenizer.chat_template")
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # ggml order: [H, I, E]
    assert shapes["blk.1.ffn_gate_exps.weight"] == (64, 24, 8) and shapes["blk.1.ffn_down_exps.weight"] == (24, 64, 8)
    assert shapes["blk.0.ffn_gate_inp.weight"] == (64, 8) and "output.weight" in shapes
    assert ("blk.0.attn_q_norm.weight" in shapes) == (family == "qwen3_moe")
    ge.verify_gguf(out)  # the checksums it records match
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down_exps.weight")
    data = bytearray(out.read_bytes())
    data[t.data_offset + 10] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"m.gguf is corrupted: tensor blk.1.ffn_down_exps.weight does not match"):
        ge.verify_gguf(out)


@pytest.mark.parametrize("family,qtype", [("qwen3_moe", "f16"), ("mixtral", "f16"), ("qwen3_moe", "q8_0"),
                                          ("mixtral", "bf16")])
def test_gguf_llama_cpp_logits(runs, hf_exports, tmp_path, family, qtype):
    """llama.cpp's next-token logits of the GGUF agree with transformers' logits of the merged checkpoint."""
    pytest.importorskip("gguf")
    import usaf.export.gguf as ge

    if not ge.have_llama_cpp():
        pytest.skip("llama_cpp is not importable (pip install llama-cpp-python builds llama.cpp from source)")
    from transformers import AutoModelForCausalLM

    ckpt, run = runs[family]
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--type", qtype]) == 0
    ids = IDS.reshape(5, 4)  # short rows: a router near-tie that flips an expert choice spoils one row only
    got = ge.llama_cpp_logits(out, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_exports[family]), dtype=torch.float32)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    err = ge.position_errors(want, got)  # per position, relative to the largest logit
    assert float((err <= ge.TOLERANCE[qtype]).float().mean()) >= 0.8, err
    assert float(err.median()) < ge.TOLERANCE[qtype] / 2, err
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    tok = usaf.load.hf.load_tokenizer(str(ckpt))
    assert ge.llama_cpp_tokens(out, ge.CHECK_TEXT) == tok(ge.CHECK_TEXT)["input_ids"]


def test_auto_dtype_follows_the_cpu_and_export_uses_the_recorded_one(tmp_path, monkeypatch):
    """``auto`` is bf16 only on a CPU with native bf16 matmuls (fp32 on AVX2-only CPUs, where torch's bf16
    matmul is many times slower); an export merges in the dtype the run recorded, whatever ``auto`` means on
    the exporting machine."""
    import usaf.load.hf as hf

    monkeypatch.setattr(hf, "cpu_bf16_is_native", lambda: True)
    assert hf.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(hf, "cpu_bf16_is_native", lambda: False)
    assert hf.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert hf.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16

    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    handle = usaf.prepare(load_model(str(ckpt), dtype=torch.bfloat16), usaf.UsafConfig(quant="none"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(ckpt), "dtype": "auto"}))
    handle.save_delta(run / "delta.safetensors", eval_settings=json.dumps({"dtype": "bf16"}))
    assert load_run(run).train_dtype == torch.bfloat16  # recorded, though auto is fp32 here (patched)
    handle.save_delta(run / "delta.safetensors")  # a delta without the record: config.yaml's auto
    assert load_run(run).train_dtype == torch.float32
