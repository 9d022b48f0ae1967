"""AdamW over the compact delta values plus fp32 router masters; warmup + cosine schedule.

The delta values are fp32 parameters already, so ``torch.optim.AdamW`` runs on them directly: AdamW
over a compact vector is exactly AdamW on the dense tensor restricted to the active positions.
Routers keep the model's dtype in the forward; their fp32 masters live here and are copied back after
every step. Reselection (RigL) remaps the moments of kept elements and zeroes those of grown ones.
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


class UsafOptimizer:
    """AdamW for a prepared model: group 0 = delta values, group 1 = router fp32 masters."""

    def __init__(self, handle: UsafModel, lr: float = 2e-4, router_lr: float = 5e-5,
                 weight_decay: float = 0.0, router_weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.handle = handle
        self.values = [d.values for d in handle.deltas().values()]
        self.routers = list(handle.router_parameters().values())
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in self.routers]
        groups = [{"params": self.values, "lr": lr, "weight_decay": weight_decay}]
        if self.masters:
            groups.append({"params": self.masters, "lr": router_lr, "weight_decay": router_weight_decay})
        self.opt = torch.optim.AdamW(groups, betas=betas, eps=eps, foreach=False)
        self.param_groups = self.opt.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.values + self.routers + self.masters:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def gradients(self) -> list[torch.Tensor]:
        """The fp32 gradients the step will use (router grads copied into the masters)."""
        for p, m in zip(self.routers, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.detach().float()
        return [p.grad for p in self.values + self.masters if p.grad is not None]

    @torch.no_grad()
    def step(self) -> None:
        self.gradients()
        self.opt.step()
        for p, m in zip(self.routers, self.masters):
            if m is not p:
                p.copy_(m.to(p.dtype))

    @torch.no_grad()
    def remap(self, old: torch.nn.Parameter, new: torch.nn.Parameter, keep_src: torch.Tensor,
              keep_dst: torch.Tensor) -> None:
        """After a delta's active set changed (``old`` values replaced by ``new``): moments of kept
        elements move from ``keep_src`` (old positions) to ``keep_dst`` (new positions); all other
        positions start at zero."""
        group = self.opt.param_groups[0]["params"]
        i = next(j for j, p in enumerate(group) if p is old)
        group[i] = new
        self.values[i] = new
        state = self.opt.state.pop(old, None)
        if not state:
            return
        for key in ("exp_avg", "exp_avg_sq"):
            moved = torch.zeros(new.numel(), dtype=state[key].dtype, device=state[key].device)
            moved[keep_dst] = state[key][keep_src]
            state[key] = moved
        self.opt.state[new] = state

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "masters": [m.detach().clone() for m in self.masters]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        self.opt.load_state_dict(sd["opt"])
        for m, saved, p in zip(self.masters, sd["masters"], self.routers):
            m.copy_(saved)
            p.copy_(saved.to(p.dtype))


def make_scheduler(opt: UsafOptimizer, warmup_steps: int, total_steps: int):
    f = lr_lambda(warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt.opt, [f] * len(opt.opt.param_groups))
