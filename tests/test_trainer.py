"""usaf inside transformers.Trainer and trl.SFTTrainer (usaf.integrations.attach) against `usaf train`.

Same tiny checkpoint, data, data order, settings and seed: the per-step losses agree within 1e-5 (relative).
Not bit-identical because the two lr schedules compute the same cosine with different float expressions
(transformers' ``cosine_with_min_lr`` vs usaf's ``lr_lambda``), which moves the learning rate by an ulp.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

import usaf
from usaf.cli import main
from usaf.integrations import SetupError, attach
from usaf.testing import save_tiny_checkpoint

STEPS, BATCH, SEQ, LR, DENSITY, RESELECT = 10, 4, 64, 0.01, 0.05, 4
RTOL = 1e-6
WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the warm sun".split()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("m") / "ckpt")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _id_rows(n=48):
    return [{"input_ids": (ids := [10 + (i * 7 + j * 3) % 90 for j in range(12 + i % 9)]), "labels": ids}
            for i in range(n)]


def _chat_rows(n=48):
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        rows.append({"messages": [{"role": "user", "content": f"Say {a} then {b}"},
                                  {"role": "assistant", "content": f"{a} {b}" + " ok" * (i % 3)}]})
    return rows


def _usaf_train(ckpt, data, out, *extra):
    evald = out.parent / f"{out.name}-eval.jsonl"  # all of --data trains, as in the Trainer
    evald.write_text("".join(data.read_text().splitlines(keepends=True)[:4]))
    rc = main(["train", "--model", str(ckpt), "--data", str(data), "--eval-data", str(evald), "--out", str(out),
               "--steps", str(STEPS), "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--lr", str(LR),
               "--density", str(DENSITY), "--reselect-every", str(RESELECT), "--dtype", "fp32", "--warmup", "0",
               "--checkpointing", "off", "--seed", "0", "--quiet", *extra])
    assert rc == 0
    return _log(out)


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def _args(out, cls=TrainingArguments, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0,
                weight_decay=0.0, max_grad_norm=0.0, logging_steps=1, save_strategy="steps", save_steps=5, seed=0,
                use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return cls(**base)


def _trainer(ckpt, out, resume=None):
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    trainer = Trainer(model=model, args=_args(out), train_dataset=_id_rows(),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True), processing_class=tok)
    attach(trainer, usaf.UsafConfig(density=DENSITY), reselect_every=RESELECT)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=RTOL), (a, b)


def test_trainer_matches_usaf_train_and_resumes_identically(ckpt, tmp_path):
    from usaf.config import TrainConfig

    # the default calibration runs past one epoch of these 48 rows: both continue into the next epoch's order
    assert TrainConfig().calib_batches > len(_id_rows()) // BATCH
    data = _write(tmp_path / "ids.jsonl", _id_rows())
    ref = _usaf_train(ckpt, data, tmp_path / "ref")
    out = tmp_path / "hf"
    trainer = _trainer(ckpt, out)
    got = _log(out)
    _close([r["loss"] for r in got], [r["loss"] for r in ref])
    _close([r["lr"] for r in got], [r["lr"] for r in ref])
    assert [r.get("reselect", {}).get("grown") for r in got] == [r.get("reselect", {}).get("grown") for r in ref]
    # the Trainer's own log has the same losses
    _close([x["loss"] for x in trainer.state.log_history if "loss" in x], [r["loss"] for r in ref])
    # checkpoints: the delta and usaf's state, no pickle
    names = {p.name for p in (out / "checkpoint-5").iterdir()}
    assert {"delta.safetensors", "usaf_state.safetensors", "usaf_state.json", "trainer_state.json"} <= names
    assert not [n for n in names if n.endswith((".pt", ".pth", ".bin"))], names
    # the final delta equals usaf train's (same active sets; values within the tolerance)
    da, db = load_file(out / "checkpoint-10" / "delta.safetensors"), load_file(tmp_path / "ref" / "delta.safetensors")
    assert da.keys() == db.keys()
    for k in da:
        if k.endswith("indices"):
            assert torch.equal(da[k], db[k]), k
        else:
            torch.testing.assert_close(da[k], db[k], rtol=1e-4, atol=1e-6)

    # resume from checkpoint-5 in a fresh process state: steps 6..10 continue identically
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(out / "checkpoint-5"), str(resumed)], check=True)
    _trainer(ckpt, resumed, resume=True)
    again = _log(resumed)
    assert [r["step"] for r in again] == list(range(6, 11))
    assert [r["loss"] for r in again] == [r["loss"] for r in got[5:]]
    d1, d2 = load_file(out / "checkpoint-10" / "delta.safetensors"), load_file(resumed / "checkpoint-10" / "delta.safetensors")
    for k in d1:
        assert torch.equal(d1[k], d2[k]), k


def test_sft_trainer_assistant_only_matches_usaf_train(ckpt, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    rows = _chat_rows()
    data = _write(tmp_path / "chat.jsonl", rows)
    ref = _usaf_train(ckpt, data, tmp_path / "ref")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    out = tmp_path / "sft"
    args = _args(out, cls=trl.SFTConfig, assistant_only_loss=True, max_length=SEQ, packing=False, bf16=False,
                 save_strategy="no")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    attach(trainer, usaf.UsafConfig(density=DENSITY), reselect_every=RESELECT)
    trainer.train()
    _close([r["loss"] for r in _log(out)], [r["loss"] for r in ref])


SCRIPT = """
import sys, torch, usaf
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
from usaf.integrations import attach
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
args = TrainingArguments(output_dir=sys.argv[2], use_cpu=True, report_to=[], max_steps=2)
opt = {opt}
trainer = Trainer(model=model, args=args, train_dataset=[{{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}}],
                  optimizers=(opt, None))
attach(trainer, usaf.UsafConfig())
trainer.train()
"""


@pytest.mark.parametrize("case", ["dense", "optimizer"])
def test_setups_usaf_cannot_serve_exit_2_with_one_line(ckpt, tmp_path, case):
    model_dir = ckpt
    opt = "None"
    if case == "dense":
        from transformers import LlamaConfig, LlamaForCausalLM

        model_dir = tmp_path / "dense"
        LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(model_dir)
    else:
        opt = "torch.optim.AdamW(model.parameters())"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(opt=opt))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(script), str(model_dir), str(out)], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("usaf")]
    assert len(lines) == 1 and lines[0].startswith("usaf: error: "), p.stderr
    assert "Traceback" not in p.stderr
    assert ("Mixture-of-Experts" in lines[0] or "not a supported" in lines[0]) if case == "dense" else "AdamW" in lines[0]
    assert not out.exists() or not any(out.iterdir())  # nothing written (the Trainer itself creates the folder)


def test_setup_error_is_catchable(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float16)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    with pytest.raises(SetupError, match="fp16"):
        attach(trainer)
