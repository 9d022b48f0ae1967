"""The one config tree: engine settings (``UsafConfig``) and run settings (``TrainConfig``).

Every field carries its help text; the CLI flags, the YAML run files and the docs are derived from
these dataclasses, and the resolved config is saved beside every run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import MISSING, dataclass, field, fields


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class UsafConfig:
    """How a model is made trainable (used by ``usaf.prepare`` and ``usaf.select``)."""

    density: float = _f(0.005, "fraction of expert weights in the trainable layers that train")
    train_layers: str = _f("all", "decoder layers that train: all | top:N | a-b (inclusive, 0-based)")
    quant: str = _f("4bit", "frozen expert storage: 4bit | 8bit | none", choices=("4bit", "8bit", "none"))
    group_size: int = _f(64, "quantization group size (64 -> 4.5 bits/weight at 4-bit)")
    quant_rounding: str = _f("mse", "how each 4-bit group's scale and minimum are chosen: mse (a weighted least-squares "
                                    "search; measured best, docs/quantization.md) | minmax (the group's min and max, "
                                    "round to nearest: 10x faster to quantize)", choices=("mse", "minmax"))
    train_router: bool = _f(True, "train the routers of the trainable layers (fp32 masters)")
    attention_density: float = _f(0.0, "fraction of the attention projection weights (q/k/v/o) of the trainable "
                                       "layers that train as sparse deltas too (0 = experts and routers only)")
    attention_units: str = _f("column", "what the attention budget picks: column (whole input columns of a "
                                        "projection; measured best, docs/quality.md) | element (single weights) | "
                                        "row (whole output rows)",
                              choices=("column", "element", "row"))
    shared_density: float = _f(0.1, "fraction of the shared experts' weights (nn.Linear shared experts of the "
                                    "trainable MoE layers) that train as sparse deltas, chosen as whole input "
                                    "columns (0 = frozen, like a dense MLP; measured best: docs/quality.md)")
    shared_units: str = _f("column", "what the shared-expert budget picks: column (whole input columns of each "
                                     "linear) | channel (whole intermediate channels of a shared expert: gate row j, "
                                     "up row j and down column j together) | element (single weights) | row "
                                     "(whole output rows)",
                           choices=("column", "channel", "element", "row"))
    router_aux_loss: bool = _f(False, "add the family's load-balancing auxiliary loss, where it has one")
    score: str = _f("signed", "importance: signed = |sum grad| (measured best: docs/quality.md), abs = sum |grad|, "
                              "sq = sum grad^2 (Fisher), adam = (sum grad)^2 / sqrt(sum grad^2), gw = |w| x sum |grad|, "
                              "random (a control)", choices=("abs", "sq", "signed", "adam", "gw", "random"))
    allocation: str = _f("global", "how the budget is spread: global (one threshold, each layer capped at "
                                   "layer_share_cap x its share) | layer | expert | stack (each gets its own density) | "
                                   "channel (whole expert channels: gate row, up row, down column)",
                         choices=("global", "layer", "expert", "stack", "channel"))
    score_seed: int = _f(0, "seed of the random score (score=random)")
    score_dtype: str = _f("bf16", "dtype of the dense importance buffers: bf16 (half the memory) | fp32",
                          choices=("bf16", "fp32"))
    score_budget_mb: int = _f(64, "memory for the dense importance buffers of the experts scored at once "
                                  "(a group of experts of one layer, at least one expert)")
    layer_share_cap: float = _f(4.0, "a layer may take at most this multiple of its fair share of budget")
    chunk_mb: int = _f(256, "max dequantized expert weights held at once per layer, MB")

    @classmethod
    def from_delta_meta(cls, meta: dict) -> UsafConfig:
        """The engine settings a delta file's metadata records (``UsafModel.delta_metadata``); a key a delta
        from before the setting lacks takes what such a run trained with."""
        return cls(quant=meta.get("quant", "none"), group_size=int(meta.get("group_size", 64)),
                   quant_rounding=meta.get("quant_rounding", "minmax"),  # a delta from before the search
                   train_layers=meta.get("train_layers", "all"), density=float(meta.get("density", 0.005)),
                   train_router=meta.get("train_router", "True") == "True",
                   attention_density=float(meta.get("attention_density", 0.0)),
                   shared_density=float(meta.get("shared_density", 0.0)))


@dataclass
class TrainConfig:
    """A training run (``usaf train``)."""

    model: str = _f("", "local Hugging Face checkpoint directory, or a hub id when online")
    data: str = _f("", "training data: .jsonl (text | prompt/completion | messages | input_ids) or .txt")
    out: str = _f("", "output directory")
    eval_data: str = _f("", "held-out data; default: a split of --data")
    steps: int = _f(0, "optimizer steps (0 = derive from --epochs)")
    epochs: float = _f(1.0, "epochs over the training data when --steps is 0")
    seq_len: int = _f(512, "tokens per sequence")
    batch_size: int = _f(4, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-3, "learning rate of the sparse expert deltas (measured best: docs/quality.md)")
    router_lr: float = _f(1e-4, "learning rate of the routers (measured best: docs/quality.md)")
    attention_lr: float = _f(0.0, "learning rate of the attention deltas (--attention-density > 0); 0 = --lr")
    shared_lr: float = _f(1e-3, "learning rate of the shared-expert deltas (--shared-density > 0; measured best: "
                                "docs/quality.md); 0 = --lr")
    weight_decay: float = _f(0.0, "AdamW weight decay of the deltas (pulls them toward the base)")
    warmup: float = _f(0.05, "warmup, as a fraction of the steps")
    reselect_every: int = _f(50, "RigL reselection period in steps (0 = off); a reselection scores one step's "
                                 "micro-batches (--grad-accum per process)")
    reselect_fraction: float = _f(0.3, "initial fraction of active elements replaced; decays to 0")
    calib_batches: int = _f(16, "micro-batches scored for the initial selection, rounded up to whole steps "
                                "(a multiple of --grad-accum x processes; measured best: docs/quality.md)")
    eval_every: int = _f(0, "evaluate every N steps (0 = only before and after)")
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept in <out>/checkpoints (the newest; at least 1)")
    max_skips: int = _f(10, "stop (with a checkpoint) after this many consecutive steps skipped for a "
                        "non-finite loss or gradient (0 = never stop)")
    max_eval_batches: int = _f(0, "cap on eval batches (0 = all)")
    checkpointing: str = _f("auto", "activation checkpointing at decoder-layer boundaries: auto (on when the "
                                    "memory plan predicts a lower training peak with it) | on | off",
                            choices=("auto", "on", "off"))
    device_memory: str = _f("", "memory budget on the compute device, e.g. 12GB (default: what it has)")
    host_memory: str = _f("", "host RAM budget, e.g. 24GB (default: what is available)")
    prefix_cache: bool = _f(True, "compute the frozen layers below the first trainable one once and cache their "
                                  "output on disk ($USAF_CACHE/prefix); they then need no memory")
    seed: int = _f(0, "random seed")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    dtype: str = _f("auto", "compute dtype: auto (bf16 where native: GPUs with bf16, CPUs with oneDNN bf16; else fp32) | bf16 | fp16 | fp32")
    resume: str = _f("", "resume the run in this output directory")
    overwrite: bool = _f(False, "replace an existing run in --out")
    quiet: bool = _f(False, "no progress bar")
    report_to: str = _f("none", "also write the scalars of log.jsonl as TensorBoard event files in <out>/tensorboard "
                                "(needs the tensorboard package: pip install 'usaf[tensorboard]')",
                        choices=("none", "tensorboard"))
    trust_remote_code: bool = _f(False, "allow model code from the checkpoint (off by default)")
    usaf: UsafConfig = field(default_factory=UsafConfig)

    def validate(self) -> None:
        """Cheap checks of the numbers, before anything is read or written."""
        cfg, u = self, self.usaf
        checks = [
            (0 < u.density <= 1, f"--density must be in (0, 1], got {u.density}"),
            (0 <= u.attention_density <= 1, f"--attention-density must be in [0, 1], got {u.attention_density}"),
            (0 <= u.shared_density <= 1, f"--shared-density must be in [0, 1], got {u.shared_density}"),
            (cfg.seq_len >= 2, f"--seq-len must be at least 2, got {cfg.seq_len}"),
            (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
            (cfg.grad_accum >= 1, f"--grad-accum must be at least 1, got {cfg.grad_accum}"),
            (cfg.steps >= 0, f"--steps must be >= 0, got {cfg.steps}"),
            (cfg.steps > 0 or cfg.epochs > 0, f"--epochs must be > 0 when --steps is 0, got {cfg.epochs}"),
            (min(cfg.lr, cfg.router_lr, cfg.attention_lr, cfg.shared_lr) >= 0,
             "--lr, --router-lr, --attention-lr and --shared-lr must be >= 0"),
            (0 <= cfg.warmup < 1, f"--warmup must be in [0, 1), got {cfg.warmup}"),
            (0 <= cfg.reselect_fraction <= 1, f"--reselect-fraction must be in [0, 1], got {cfg.reselect_fraction}"),
            (min(cfg.reselect_every, cfg.eval_every, cfg.save_every, cfg.max_eval_batches) >= 0,
             "--reselect-every, --eval-every, --save-every and --max-eval-batches must be >= 0"),
            (cfg.calib_batches >= 1, f"--calib-batches must be at least 1, got {cfg.calib_batches}"),
            (cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1, got {cfg.keep_checkpoints}"),
            (cfg.max_skips >= 0, f"--max-skips must be >= 0, got {cfg.max_skips}"),
            (u.group_size >= 1, f"--group-size must be at least 1, got {u.group_size}"),
        ]
        # the allocations RigL keeps (usaf.engine.rigl.RESELECTABLE; config imports nothing of the engine)
        checks.append((u.allocation in ("global", "layer", "stack") or cfg.reselect_every == 0,
                       f"--allocation {u.allocation} keeps a fixed budget per unit: use --reselect-every 0 "
                       f"(RigL reselection needs --allocation global, layer or stack)"))
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("--report-to tensorboard needs the tensorboard package: pip install 'usaf[tensorboard]'")
        if cfg.report_to not in ("none", "tensorboard"):
            raise ValueError(f"--report-to must be none or tensorboard, got {cfg.report_to!r}")


def to_dict(cfg) -> dict:
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if hasattr(v, "__dataclass_fields__") else v
    return out


# Keys that older versions wrote into a run's config.yaml and that no longer set anything: read and ignored,
# so that such a file still works as --config.
RETIRED = {"score_layers"}  # selection scores every layer in one pass per batch since 2026-12-03


def from_dict(cls, data: dict):
    """Build a config from a (possibly partial) dict; unknown keys are an error naming the key."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in data.items():
        k = k.replace("-", "_")
        if k in RETIRED and k not in known:
            continue
        if k not in known:
            raise ValueError(f"unknown config key {k!r} (known: {', '.join(known)})")
        factory = known[k].default_factory
        if factory is not MISSING and isinstance(v, dict):
            v = from_dict(factory, v)
        kwargs[k] = v
    return cls(**kwargs)
