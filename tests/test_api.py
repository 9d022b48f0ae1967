"""The Python API in transformers' Trainer."""

import torch

import usaf
from usaf.testing import make_tiny_model


def test_prepared_model_trains_in_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_tiny_model("qwen3_moe")
    handle = usaf.prepare(model, usaf.UsafConfig(quant="4bit", density=0.05))
    seq = torch.arange(32) % 7 + 10

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            return {"input_ids": seq, "labels": seq}

    usaf.select(handle, [{"input_ids": seq.repeat(4, 1), "labels": seq.repeat(4, 1)}])
    opt = usaf.UsafOptimizer(handle, lr=1e-2, router_lr=1e-3)
    router0 = next(iter(handle.router_parameters().values())).detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=16,
                             logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Data(),
                      optimizers=(opt, usaf.make_scheduler(opt, 2, 16)))
    trainer.train()
    losses = [x["loss"] for x in trainer.state.log_history if "loss" in x]
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(next(iter(handle.router_parameters().values())), router0)
    assert all(d.values.abs().sum() > 0 for d in handle.deltas().values())
