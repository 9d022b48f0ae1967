"""``usaf bench quality``: corpora parsing, every method's setup on a tiny model, the report end to end.

The benchmark's figures come from the real corpora and the upcycled SmolLM2 (docs/benchmarks.md); here
the corpora are small stand-ins in the same formats and the model is a tiny random Mixtral.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import usaf
from usaf.bench.corpora import (
    CorpusError,
    clean_rst,
    general_documents,
    held_out,
    reference_entries,
    write_task_files,
)
from usaf.bench.methods import (
    DEFAULT_METHODS,
    ScopeError,
    check_scope,
    expected_trainable,
    parse_method,
    setup_method,
)
from usaf.bench.quality import (
    expand_methods,
    load_task,
    parse_settings,
    read_task,
    run_quality,
    run_worker,
    save_task,
    task_files,
)
from usaf.testing import save_tiny_checkpoint

RST = """\
:mod:`os.path` --- Common pathname manipulations
================================================

.. module:: os.path

This module implements some useful functions on pathnames.

.. function:: join(path, *paths)

   Join one or more path segments intelligently.  The return value is the
   concatenation of *path* and all members of *\\*paths*, see :func:`os.sep`.

   On Windows, the drive is not reset.

.. function:: short(x)

   Too short.

.. class:: Thing(a)

   A thing that holds ``a`` and does :meth:`~Thing.go` whenever it is asked to.

   .. method:: go()

      Go somewhere useful, as the :ref:`guide <go-guide>` explains in some detail, and come back.

   .. versionadded:: 3.2
"""

FORTUNE = "A short one.\n%\nThe only thing we have to fear is fear itself, said someone long ago.\n%\n" \
          "Whatever you are, be a good one, and be it with all of your heart and mind.\n%\n"


def make_corpora(root, n_files: int = 24):
    docs = root / "usr/share/doc/python3.11/html/_sources"
    (docs / "library").mkdir(parents=True)
    (docs / "tutorial").mkdir()
    for i in range(n_files):
        (docs / "library" / f"mod{i}.rst.txt").write_text(RST.replace("os.path", f"pkg{i}.path"))
        (docs / "tutorial" / f"part{i}.rst.txt").write_text(f"Part {i}\n=======\n\nPython is a language. " * 40)
    fort = root / "usr/share/games/fortunes"
    fort.mkdir(parents=True)
    for name in ("literature", "wisdom", "people"):
        (fort / name).write_text(FORTUNE * 20)
    (fort / "computers").write_text("Computers are off-domain here and left out of the general corpus.\n%\n")
    return docs, fort


def test_clean_rst():
    assert clean_rst("see :func:`os.sep` and :meth:`~Thing.go`, ``a`` *b* **c**") == "see os.sep and Thing.go, a b c"
    assert clean_rst(":ref:`the guide <go-guide>`  spans\n  lines") == "the guide spans lines"
    assert clean_rst(r"members of *\*paths*") == "members of *paths"


def test_corpora_parsing(tmp_path):
    docs, fort = make_corpora(tmp_path, n_files=1)
    entries = reference_entries(docs)
    sigs = [s for _, s, _ in entries]
    assert sigs == ["pkg0.path.join(path, *paths)", "pkg0.path.Thing(a)", "pkg0.path.Thing.go()"]
    assert entries[0][2].startswith("Join one or more path segments intelligently. The return value")
    assert "On Windows" not in entries[0][2]  # first paragraph only
    general = general_documents(fort)
    assert all(not name.startswith("computers") for name, _ in general)
    assert all("short one" not in text for _, text in general)
    assert len(general) == 3 * 20 * 2


def test_held_out_is_deterministic():
    names = [f"f{i}" for i in range(1000)]
    picked = [n for n in names if held_out(n, 0.1)]
    assert picked == [n for n in names if held_out(n, 0.1)]
    assert 60 < len(picked) < 140
    assert picked != [n for n in names if held_out(n, 0.1, seed=1)]


def test_missing_corpora_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("USAF_CORPORA", str(tmp_path / "nothing"))
    monkeypatch.setattr("usaf.bench.corpora.SYSTEM_ROOT", tmp_path / "system")
    with pytest.raises(CorpusError, match="fetch-corpora.sh"):
        write_task_files(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # the CLI: one line, exit 2, before any model is built
    from usaf.cli import main

    assert main(["bench", "quality", "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fetch-corpora.sh" in err[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    make_corpora(root / "corpora")
    mp = pytest.MonkeyPatch()
    mp.setenv("USAF_CORPORA", str(root / "corpora"))
    paths = write_task_files(root / "data")
    mp.undo()
    model = save_tiny_checkpoint("mixtral", root / "model", dtype=torch.bfloat16)
    cfg = parse_settings(["seq=32", "batch=2", "steps=4", "eval_seqs=2", "calib=1", "reselect=2", "generations=1",
                          "gen_tokens=4", "density=0.05", "layers=top:1"])
    cfg["model_dir"], cfg["data_dir"] = str(model), str(root / "data")
    return cfg, paths


def test_task_files_split_by_file(setup):
    cfg, paths = setup
    train = [json.loads(x) for x in paths["chat_train"].read_text().splitlines()]
    held = [json.loads(x) for x in paths["chat_eval"].read_text().splitlines()]
    assert train and held
    questions = {r["messages"][0]["content"] for r in train}
    assert not questions & {r["messages"][0]["content"] for r in held}
    assert set(task_files("chat", paths["chat_train"].parent)) == {"train", "eval", "general"}


# the engine's score and allocation options are tested against dense autograd in tests/test_select.py
VARIANTS = ["lora-r16-experts", "usaf/alloc=channel/rigl=0/router=0", "usaf/quant=4bit", "esft/top_p=0.9"]


@pytest.mark.parametrize("method", list(DEFAULT_METHODS) + VARIANTS)
def test_method_trains_only_its_scope(setup, method):
    """Every method changes only its own tensors in the chosen layers (top 1 of 2), and its trainable count
    equals what its scope computes from the model's shapes (asserted inside setup_method as well)."""
    from transformers import AutoModelForCausalLM

    from usaf.load.hf import load_tokenizer

    cfg, _ = setup
    tok = load_tokenizer(cfg["model_dir"])
    data = load_task(cfg, "docs", tok, task_files("docs", __import__("pathlib").Path(cfg["data_dir"])))
    ref_model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    ref = ref_model.state_dict()
    m = parse_method(method, cfg)
    st = setup_method(m, cfg, cfg["model_dir"], data)
    # every method trains in training mode; usaf's checkpointing choice is in effect (transformers
    # checkpoints a layer only while it is training)
    assert all(mod.training for mod in st.model.modules())
    if m.name == "usaf":
        from usaf.engine.checkpointing import is_checkpointing

        assert is_checkpointing(st.model.usaf) == st.info["checkpointing"]
    losses = [st.step(b) for b in data["train"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert st.trainable > 0 and st.ship() > 0
    model, info = st.model, st.info
    if m.name == "esft":
        assert st.trainable == expected_trainable(m, ref_model, range(1, 2), info["experts"])
    else:
        assert st.trainable == expected_trainable(m, ref_model, range(1, 2))
    if m.name in ("usaf", "router"):
        from usaf.engine.model import effective_weight

        def effective(handle):
            eff = {f"{x.prefix}.{n}": effective_weight(x, n, torch.float32) for x in handle.layers for n in
                   ("gate_up_proj", "down_proj")}
            out = {k: v for k, v in handle.model.state_dict().items() if ".experts." not in k}
            out.update(eff)
            return out

        state = effective(model.usaf)
        # the reference: the same model prepared alike (a 4-bit base is quantized in every layer), no training
        fresh = AutoModelForCausalLM.from_pretrained(
            cfg["model_dir"], dtype=torch.float32 if info["dtype"] == "fp32" else torch.bfloat16)
        ref = effective(usaf.prepare(fresh, model.usaf.config))
    elif m.name == "lora":
        state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                 for k, v in model.state_dict().items() if "lora_" not in k}
        adapters = [k for k in model.state_dict() if "lora_" in k]
        assert adapters and all(".layers.1." in k for k in adapters), adapters  # the scoped layer only
        assert any(".experts." in k for k in adapters)
        assert any("q_proj" in k for k in adapters) == bool(m.opts["attn"])
    else:
        state = model.state_dict()
    changed = {k for k, v in state.items() if k in ref and not torch.equal(v.float(), ref[k].float())}
    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    if m.name == "router":
        assert changed and all(k.startswith(last) and ".gate." in k for k in changed), changed
    elif m.name == "usaf":
        assert changed and all(k.startswith(last) and (".experts." in k or ".gate." in k) for k in changed)
        assert any(".gate." in k for k in changed) == bool(m.opts["router"])
    elif m.name == "full":
        assert changed and all(k.startswith(last) and (".experts." in k or ".gate." in k) for k in changed)
    elif m.name == "esft":
        picked = info["experts"][1]
        assert changed and all(k.startswith(last) and ".experts." in k for k in changed)
        for k in changed:  # the picked experts' rows changed, the others are bit-identical
            rows = [e for e in range(ref[k].shape[0]) if not torch.equal(state[k][e].float(), ref[k][e].float())]
            assert set(rows) <= set(picked) and rows, (k, rows, picked)
    else:  # LoRA leaves the base untouched
        assert not changed


def test_scope_check_catches_lora_on_every_layer(setup):
    """PEFT ignores layers_to_transform for target_parameters: suffix targets adapt every layer's experts.
    The scope check refuses exactly that (it is what the quality bench once measured by mistake)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg, _ = setup
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    m = parse_method("lora/r=4/attn=0", cfg)
    expected = expected_trainable(m, model, range(1, 2))
    lcfg = LoraConfig(r=4, lora_alpha=8, target_parameters=["mlp.experts.gate_up_proj",
                                                            "mlp.experts.down_proj"],
                      layers_to_transform=[1])
    peft = get_peft_model(model, lcfg)
    names = [n for n, p in peft.named_parameters() if p.requires_grad]
    live = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert live == 2 * expected  # both layers adapted, not one
    with pytest.raises(ScopeError):
        check_scope(m, expected, live, names, range(1, 2))


@pytest.fixture(scope="module")
def qwen2_cfg(setup, tmp_path_factory):
    """The same settings and data on a tiny qwen2_moe (a shared expert of nn.Linear modules in every layer)."""
    cfg, _ = setup
    model = save_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("quality-qwen2") / "model", dtype=torch.bfloat16)
    return dict(cfg, model_dir=str(model))


@pytest.mark.parametrize("method", ["usaf/shared=0.1/rigl=0", "lora/r=2/attn=0/shared=1", "lora/r=2/shared=1"])
def test_shared_expert_options_train_their_scope(qwen2_cfg, method):
    """usaf's shared= (sparse deltas on the shared experts' linears, whole input columns: exactly the budget) and
    LoRA's shared=1 (adapters on them) train the shared experts of the chosen layer only, as their scope says
    (asserted inside setup_method as well)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from usaf.load.hf import load_tokenizer

    cfg = qwen2_cfg
    data = load_task(cfg, "docs", load_tokenizer(cfg["model_dir"]), task_files("docs", Path(cfg["data_dir"])))
    ref_model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32)
    m = parse_method(method, cfg)
    without = parse_method(method.replace("shared=0.1", "shared=0").replace("shared=1", "shared=0"), cfg)
    st = setup_method(m, cfg, cfg["model_dir"], data)
    assert st.trainable == expected_trainable(m, ref_model, range(1, 2)) > expected_trainable(without, ref_model,
                                                                                              range(1, 2))
    assert all(torch.isfinite(torch.tensor([st.step(b) for b in data["train"][:2]])))
    if m.name == "usaf":
        handle = st.model.usaf
        assert set(handle.shared) == {f"model.layers.1.mlp.shared_expert.{p}.weight"
                                      for p in ("gate_proj", "up_proj", "down_proj")}
        assert st.trainable - expected_trainable(without, ref_model, range(1, 2)) == handle.shared_budget() > 0
        assert sum(len(d) for d in handle.shared_deltas().values()) == handle.shared_budget()
    else:
        adapters = [k for k in st.model.state_dict() if "lora_A" in k]
        shared = {k.split(".lora_A")[0].split("model.layers.")[1] for k in adapters if "shared_expert" in k}
        assert shared == {f"1.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        assert all(".layers.1." in k for k in adapters)
        assert any("q_proj" in k for k in adapters) == bool(m.opts["attn"])


def test_lora_shared_needs_linear_shared_experts(setup):
    """mixtral has no shared expert: lora's shared=1 is refused rather than silently adding nothing."""
    from pathlib import Path

    from usaf.load.hf import load_tokenizer

    cfg, _ = setup
    data = load_task(cfg, "docs", load_tokenizer(cfg["model_dir"]), task_files("docs", Path(cfg["data_dir"])))
    with pytest.raises(ValueError, match="no nn.Linear shared experts"):
        setup_method(parse_method("lora/r=2/shared=1", cfg), cfg, cfg["model_dir"], data)


def test_method_specs_and_grids(setup):
    cfg, _ = setup
    assert expand_methods("usaf/density=0.005|0.01/lr=1e-3,lora/r=2|4") == [
        "usaf/density=0.005/lr=1e-3", "usaf/density=0.01/lr=1e-3", "lora/r=2", "lora/r=4"]
    m = parse_method("usaf-norigl", cfg)
    assert m.name == "usaf" and m.opts["rigl"] == 0 and m.opts["density"] == cfg["density"]
    assert parse_method("lora-r16-experts", cfg).opts == dict(parse_method("lora/r=16/attn=0", cfg).opts)
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("qlora", cfg)
    with pytest.raises(ValueError, match="not key=value"):
        parse_method("usaf/rank=4", cfg)
    with pytest.raises(ValueError, match="alloc=expert needs rigl=0"):  # refused before a worker starts
        parse_method("usaf/alloc=expert", cfg)
    assert parse_method("usaf/alloc=expert/rigl=0", cfg).opts["alloc"] == "expert"
    assert parse_method("usaf/alloc=layer", cfg).opts["alloc"] == "layer"  # RigL keeps per-layer budgets


@pytest.mark.parametrize("task", ["docs", "chat"])
def test_task_file_holds_the_batches_the_worker_would_tokenize(setup, tmp_path, task):
    """The parent tokenizes each task once and its workers read the file: the same batches, bit for bit, and the
    same perplexity as the worker that tokenizes the files itself."""
    from usaf.load.hf import load_tokenizer

    cfg, _ = setup
    cfg = dict(cfg, seq=256)
    data = load_task(cfg, task, load_tokenizer(cfg["model_dir"]), task_files(task, Path(cfg["data_dir"])))
    save_task(data, tmp_path / "t.safetensors")
    back = read_task(tmp_path / "t.safetensors")
    assert set(back) == set(data)
    for k in ("train", "eval", "general", "calib"):
        assert len(back[k]) == len(data[k]) > 0
        for a, b in zip(back[k], data[k]):
            assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert back["train_tokens"] == data["train_tokens"] and back.get("prompts") == data.get("prompts")
    if task == "docs":
        via_file = run_worker("base", task, dict(cfg, task_data={task: str(tmp_path / "t.safetensors")}))
        assert via_file["ppl_domain"] == run_worker("base", task, cfg)["ppl_domain"]


def test_worker_reports(setup):
    cfg, _ = setup
    cfg = dict(cfg, seq=256)  # a character-level tokenizer: a question and its answer need ~200 tokens
    base = run_worker("base", "chat", cfg)
    assert base["ppl_domain"] > 1 and base["ppl_general"] > 1 and len(base["generations"]) == 1
    rec = run_worker("usaf", "chat", cfg)
    for k in ("ppl_domain", "ppl_general", "tokens_per_s", "peak_rss_mb", "trainable_params", "shipped_bytes"):
        assert rec[k] > 0, k
    assert rec["train_tokens"] <= cfg["steps"] * cfg["batch"] * cfg["seq"]


def test_run_quality_end_to_end(setup, tmp_path, capsys):
    cfg, _ = setup
    out = tmp_path / "q.json"
    code = run_quality(str(out), extra=["seq=32", "batch=2", "steps=2", "eval_seqs=2", "calib=1", "layers=top:1",
                                        "methods=usaf,lora-r16", f"model={cfg['model_dir']}",
                                        f"data={cfg['data_dir']}", "task=docs"])
    assert code == 0
    doc = json.loads(out.read_text())
    task = doc["tasks"]["docs"]
    assert [r["method"] for r in task["results"]] == ["usaf", "lora-r16"]
    assert {t["target"] for t in task["targets"]} == {"usaf in-domain ppl <= lora r16",
                                                      "usaf forgetting (general ppl increase) <= lora r16",
                                                      "memory training adds <= 15% of lora r16's"}
    assert "| usaf" in capsys.readouterr().out


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown method"):
        parse_settings(["methods=usaf,qlora"])
    with pytest.raises(ValueError, match="task must be"):
        parse_settings(["task=code"])
    with pytest.raises(ValueError, match="not key=value"):
        parse_settings(["steps"])


def test_bench_dtype_follows_the_cpu_and_a_method_may_override_it(monkeypatch):
    from usaf import units

    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(units, "cpu_bf16_is_native", lambda native=native: native)
        cfg = parse_settings([])
        assert cfg["dtype"] == want
        assert all(parse_method(m, cfg).opts["dtype"] == want for m in ("usaf", "router", "lora/r=2"))
        assert parse_method("lora/r=2/dtype=bf16", cfg).opts["dtype"] == "bf16"
    assert parse_settings(["dtype=bf16"])["dtype"] == "bf16"
    with pytest.raises(ValueError, match="dtype"):
        parse_settings(["dtype=fp16"])
