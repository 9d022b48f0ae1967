"""AdamW over the compact delta values plus fp32 router masters, with loss scaling; warmup + cosine schedule.

The delta values are fp32 parameters already, so ``torch.optim.AdamW`` runs on them directly: AdamW over a
compact vector is exactly AdamW on the dense tensor restricted to the active positions. Routers keep the
model's dtype in the forward; their fp32 masters live here and are copied back after every step.

:class:`UsafOptimizer` owns everything about a step: the loss scale (fp16), unscaling and the finiteness
check, the AdamW update, replacing a delta's active set while keeping the moments of kept elements
(:meth:`UsafOptimizer.replace_active`, used by RigL), and its state for checkpoints
(:meth:`UsafOptimizer.state_dict`: safetensors-ready tensors + JSON-ready metadata).
"""

from __future__ import annotations

import math

import torch

from .model import UsafModel


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


class LossScaler:
    """Dynamic loss scaling for fp16 compute; disabled (scale 1, a no-op) for bf16 / fp32.

    The loss is multiplied by ``scale`` before backward so that small fp16 gradients do not flush to zero.
    Before the optimizer step every gradient it uses - the delta values' and the routers' fp32 masters' -
    is divided by ``scale`` (a power of two: exact). A non-finite gradient means the scale was too large:
    the step is skipped and the scale multiplied by ``backoff``; after ``growth_interval`` finite steps in a
    row it is multiplied by ``growth``. The state is saved in checkpoints, so a resumed run continues with
    the same scale.
    """

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 2.0**-24, max_scale: float = 2.0**24):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth, self.backoff, self.growth_interval = growth, backoff, growth_interval
        self.min_scale, self.max_scale = min_scale, max_scale
        self.good_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, grads: list[torch.Tensor]) -> bool:
        """Divide every gradient by the scale in place; True when all of them are finite."""
        finite = True
        for g in grads:
            if self.enabled:
                if g.dtype != torch.float32:
                    raise TypeError(f"loss scaling needs fp32 gradients, got {g.dtype}")
                g.mul_(1.0 / self.scale)
            finite = finite and bool(torch.isfinite(g).all())
        return finite

    def update(self, grads_finite: bool) -> None:
        if not self.enabled:
            return
        if grads_finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale = min(self.scale * self.growth, self.max_scale)
                self.good_steps = 0
        else:
            self.scale = max(self.scale * self.backoff, self.min_scale)
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "scale": self.scale, "good_steps": self.good_steps,
                "growth": self.growth, "backoff": self.backoff, "growth_interval": self.growth_interval}

    def load_state_dict(self, sd: dict | None) -> None:
        if self.enabled and sd and sd.get("enabled"):
            self.scale = float(sd["scale"])
            self.good_steps = int(sd["good_steps"])


class UsafOptimizer:
    """AdamW for a prepared model: group 0 = expert delta values, then the router fp32 masters (when the routers
    train), then the attention delta values (when there are attention deltas; ``attention_lr``, default ``lr``),
    then the shared experts' delta values (when there are; ``shared_lr``, 1e-3 by default, ``None`` = ``lr``;
    ``weight_decay`` as the expert deltas).
    ``group_names`` names the groups in order.

    ``scaler``: a :class:`LossScaler` (fp16 compute); by default a disabled one (bf16 / fp32).
    """

    def __init__(self, handle: UsafModel, lr: float = 3e-3, router_lr: float = 1e-4,
                 weight_decay: float = 0.0, router_weight_decay: float = 0.0, attention_lr: float | None = None,
                 shared_lr: float | None = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, scaler: LossScaler | None = None):
        self.handle = handle
        self.scaler = scaler or LossScaler(enabled=False)
        experts = [d.values for d in handle.deltas().values()]
        attention = [d.values for d in handle.attention_deltas().values()]
        shared = [d.values for d in handle.shared_deltas().values()]
        self.values = experts + attention + shared  # expert deltas first: their positions in group 0 are theirs here
        self.routers = list(handle.router_parameters().values())
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in self.routers]
        groups = [{"params": experts, "lr": lr, "weight_decay": weight_decay}]
        self.group_names = ["deltas"]
        if self.masters:
            groups.append({"params": self.masters, "lr": router_lr, "weight_decay": router_weight_decay})
            self.group_names.append("routers")
        if attention:
            groups.append({"params": attention, "lr": lr if attention_lr is None else attention_lr,
                           "weight_decay": weight_decay})
            self.group_names.append("attention")
        if shared:
            groups.append({"params": shared, "lr": lr if shared_lr is None else shared_lr,
                           "weight_decay": weight_decay})
            self.group_names.append("shared")
        self._adamw = torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)

    @property
    def param_groups(self) -> list[dict]:
        return self._adamw.param_groups

    @property
    def torch_optimizer(self) -> torch.optim.Optimizer:
        """The ``torch.optim.AdamW`` inside, for lr schedulers (they drive its ``param_groups``' lr)."""
        return self._adamw

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.values + self.routers + self.masters:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call ``backward`` on (multiplied by the fp16 loss scale; unchanged otherwise)."""
        return self.scaler.scale_loss(loss)

    def gradients(self) -> list[torch.Tensor]:
        """The fp32 gradients the step uses (router grads copied into the masters)."""
        for p, m in zip(self.routers, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.detach().float()
        return [p.grad for p in self.values + self.masters if p.grad is not None]

    @torch.no_grad()
    def step(self, loss: float | None = None) -> bool:
        """Unscale the gradients and check them; take the AdamW step when they (and ``loss``, if given) are
        finite; update the loss scale. Returns whether the step was taken."""
        grads_finite = self.scaler.unscale_(self.gradients())
        stepped = grads_finite and (loss is None or math.isfinite(loss))
        if stepped:
            self._adamw.step()
            for p, m in zip(self.routers, self.masters):
                if m is not p:
                    p.copy_(m.to(p.dtype))
        self.scaler.update(grads_finite)
        return stepped

    @torch.no_grad()
    def replace_active(self, old: torch.nn.Parameter, new: torch.nn.Parameter, keep_src: torch.Tensor,
                       keep_dst: torch.Tensor) -> None:
        """After a delta's active set changed (``old`` values replaced by ``new``): moments of kept elements
        move from ``keep_src`` (old positions) to ``keep_dst`` (new positions); all other positions start
        at zero."""
        group = self._adamw.param_groups[0]["params"]
        i = next(j for j, p in enumerate(group) if p is old)
        group[i] = new
        self.values[i] = new
        state = self._adamw.state.pop(old, None)
        if not state:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            moved = torch.zeros(new.numel(), dtype=state[key].dtype, device=state[key].device)
            moved[keep_dst] = state[key][keep_src]
            state[key] = moved
        self._adamw.state[new] = state

    # -- state ------------------------------------------------------------------------------------------
    def state_of(self, p: torch.Tensor) -> dict:
        """AdamW's state of one trainable tensor (``step``, ``exp_avg``, ``exp_avg_sq``; empty before a step)."""
        return self._adamw.state.get(p, {})

    def state_dict(self) -> dict:
        """``{"tensors": {name: tensor}, "meta": {...}}``: the moments and router masters as named tensors
        (for a safetensors file), step counts, learning rates and the loss scale as JSON-ready values."""
        tensors, steps = {}, {}
        for group, params in (("v", self.values), ("r", self.masters)):
            for i, p in enumerate(params):
                st = self._adamw.state.get(p)
                if st:
                    tensors[f"opt::{group}{i}.exp_avg"] = st["exp_avg"].detach().cpu()
                    tensors[f"opt::{group}{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu()
                    steps[f"{group}{i}"] = float(st["step"])
        for i, m in enumerate(self.masters):
            tensors[f"master::{i}"] = m.detach().cpu().clone()  # may be the router itself (fp32)
        meta = {"opt_steps": steps, "lrs": [g["lr"] for g in self._adamw.param_groups],
                "loss_scaler": self.scaler.state_dict()}
        return {"tensors": tensors, "meta": meta}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (after the active sets and routers were restored)."""
        tensors, meta = sd["tensors"], sd["meta"]
        for group, params in (("v", self.values), ("r", self.masters)):
            for i, p in enumerate(params):
                key = f"opt::{group}{i}"
                if f"{key}.exp_avg" in tensors:
                    self._adamw.state[p] = {
                        "step": torch.tensor(meta["opt_steps"][f"{group}{i}"]),
                        "exp_avg": tensors[f"{key}.exp_avg"].to(p.device),
                        "exp_avg_sq": tensors[f"{key}.exp_avg_sq"].to(p.device),
                    }
        for i, (m, r) in enumerate(zip(self.masters, self.routers)):
            m.copy_(tensors[f"master::{i}"])
            r.copy_(m.to(r.dtype))
        for g, lr in zip(self._adamw.param_groups, meta.get("lrs", [])):
            g["lr"] = lr
        self.scaler.load_state_dict(meta.get("loss_scaler"))


def make_scheduler(opt: UsafOptimizer, warmup_steps: int, total_steps: int):
    """Linear warmup + cosine decay (:func:`lr_lambda`) for every group."""
    f = lr_lambda(warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt.torch_optimizer, [f] * len(opt.param_groups))


def set_peak_lrs(opt: UsafOptimizer, sched, lrs: list[float]) -> None:
    """New peak learning rates (a resumed run with a changed ``--lr``/``--router-lr``), from the current
    point of the schedule on."""
    sched.base_lrs = list(lrs)[: len(opt.param_groups)]
    for g, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        g["lr"] = base * f(sched.last_epoch)
