"""``usaf bench quality``: corpora parsing, every method's setup on a tiny model, the report end to end.

The benchmark's figures come from the real corpora and the upcycled SmolLM2 (docs/benchmarks.md); here
the corpora are small stand-ins in the same formats and the model is a tiny random Mixtral.
"""

from __future__ import annotations

import json

import pytest
import torch

from usaf.bench.corpora import (
    CorpusError,
    clean_rst,
    general_documents,
    held_out,
    reference_entries,
    write_task_files,
)
from usaf.bench.quality import (
    EXTRA_METHODS,
    METHODS,
    load_task,
    parse_settings,
    run_quality,
    run_worker,
    setup_method,
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


@pytest.mark.parametrize("method", METHODS + EXTRA_METHODS)
def test_method_trains_only_its_parameters(setup, method):
    from transformers import AutoModelForCausalLM

    from usaf.load.hf import load_tokenizer

    cfg, _ = setup
    tok = load_tokenizer(cfg["model_dir"])
    data = load_task(cfg, "docs", tok, task_files("docs", __import__("pathlib").Path(cfg["data_dir"])))
    ref = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32).state_dict()
    model, trainable, step, info, ship = setup_method(method, cfg, cfg["model_dir"], data)
    losses = [step(b) for b in data["train"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert trainable > 0 and ship() > 0
    if method in ("usaf", "usaf-norigl", "router"):
        from usaf.engine.model import effective_weight

        handle = model.usaf
        eff = {f"{m.prefix}.{n}": effective_weight(m, n, torch.float32) for m in handle.layers for n in
               ("gate_up_proj", "down_proj")}
        state = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
        state.update(eff)
    else:
        state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                 for k, v in model.state_dict().items() if "lora_" not in k}
    changed = {k for k, v in state.items() if k in ref and not torch.equal(v.float(), ref[k].float())}
    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    if method == "router":
        assert changed and all(k.startswith(last) and ".gate." in k for k in changed), changed
    elif method in ("usaf", "usaf-norigl"):
        assert changed and all(k.startswith(last) and (".experts." in k or ".gate." in k) for k in changed)
    elif method == "full":
        assert changed and all(k.startswith(last) and (".experts." in k or ".gate." in k) for k in changed)
    elif method == "esft":
        assert len(info["experts"]) == 1
        assert changed and all(k.startswith(last) and ".experts." in k for k in changed)
        for k in changed:  # one expert's rows changed, the others are bit-identical
            rows = [e for e in range(ref[k].shape[0]) if not torch.equal(state[k][e].float(), ref[k][e].float())]
            assert len(rows) == 1, (k, rows)
    else:  # LoRA leaves the base untouched
        assert not changed


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
    assert {t["target"] for t in task["targets"]} == {"usaf in-domain ppl <= lora-r16",
                                                      "usaf forgetting (general ppl increase) <= lora-r16",
                                                      "usaf peak RSS <= lora-r16"}
    assert "| usaf" in capsys.readouterr().out


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown method"):
        parse_settings(["methods=usaf,qlora"])
    with pytest.raises(ValueError, match="task must be"):
        parse_settings(["task=code"])
    with pytest.raises(ValueError, match="not key=value"):
        parse_settings(["steps"])
