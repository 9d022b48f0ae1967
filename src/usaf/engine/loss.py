"""The causal-LM loss without a full logits tensor: the LM head and cross-entropy in row chunks.

``B x T x V`` logits, their fp32 upcast, log-softmax and gradient are the largest tensors of a training step
on a small model (and ~0.9 GB at seq 512 for a 152k vocabulary). :func:`lm_loss` runs the model with its
output head swapped for a capture of the final hidden states, then computes the summed token loss chunk by
chunk in a custom autograd function that also computes each chunk's gradient while its logits exist: no
tensor larger than one chunk of logits exists at any time, and the head's matmul runs once forward and once
for the gradient. The result equals ``token_weighted_loss(model(...).logits, labels)``
(transformers' ``ForCausalLMLoss``: logits in the compute dtype, upcast to fp32, shifted labels, ``-100``
ignored) up to float summation order; the family's logit post-processing (Granite's ``logits_scaling``,
Gemma's final soft-capping) is applied the same way, in the compute dtype.

The head's weights must be frozen (they are in usaf: only expert deltas and routers train).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .forward import logits_of
from .model import compute_device

IGNORE_INDEX = -100
CHUNK_BYTES = 8 << 20  # fp32 logits per chunk (at least MIN_ROWS rows, so a large head is not re-read often)
# 64, not 256: a chunk's logits exist as bf16, fp32 and exp temporaries at once; at 256 rows of a 49K vocab
# that was ~150 MB of the moefy bed's step peak (measured: step peak 967 -> 894 MB RSS at 64 rows).
MIN_ROWS = 64


def logit_post(config) -> tuple[float | None, float | None]:
    """``(divide by, soft-cap)`` the family applies to ``lm_head`` output (None where it does not)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaling = getattr(text, "logits_scaling", None)
    cap = getattr(text, "final_logit_softcapping", None)
    return (float(scaling) if scaling not in (None, 1, 1.0) else None), (float(cap) if cap else None)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed token cross-entropy of ``hidden @ weight.T`` (+ bias, the family's post-processing), a chunk of
    rows at a time. When the hidden states need a gradient, each chunk's gradient is computed in the forward
    while its logits exist (``softmax - onehot``, times the head): the backward only scales it by the upstream
    gradient, so the head's matmul runs twice per step instead of three times (the loss is the end of the
    graph: nothing else depends on it). The chunk's logits live in two buffers reused from chunk to chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scaling, cap, rows):
        n = hidden.shape[0]
        want = ctx.needs_input_grad[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want else None
        m = min(rows, n)
        zb = hidden.new_empty(m, weight.shape[0])  # the chunk's logits in the compute dtype
        z32 = torch.empty(m, weight.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, n, rows):
            h = hidden[s : s + rows]
            k = h.shape[0]
            raw = torch.mm(h, weight.t(), out=zb[:k])
            if bias is not None:
                raw.add_(bias)
            if scaling is not None:
                raw.div_(scaling)
            t = None
            if cap is not None:
                t = torch.tanh(raw / cap)
                torch.mul(t, cap, out=raw)
            z = z32[:k].copy_(raw)
            lab = labels[s : s + rows]
            valid = lab != IGNORE_INDEX
            picked = z.gather(1, lab.clamp(min=0).unsqueeze(1)).squeeze(1)
            top = z.amax(dim=-1)
            p = z.sub_(top.unsqueeze(1)).exp_()  # in place: exp(z - max)
            sums = p.sum(dim=-1)
            lse = top + sums.log()
            total += ((lse - picked) * valid).sum()
            if not want:
                continue
            # d(sum CE)/dz = softmax(z) - onehot(label), on valid rows
            p.div_(sums.unsqueeze(1))
            p.scatter_add_(1, lab.clamp(min=0).unsqueeze(1), torch.full_like(sums, -1.0).unsqueeze(1))
            p.mul_(valid.unsqueeze(1))
            g = raw.copy_(p)  # back to the compute dtype, in the logits' buffer
            if t is not None:  # d(cap * tanh(x / cap))/dx = 1 - tanh^2
                g.mul_(1 - t * t)
            if scaling is not None:
                g.div_(scaling)
            torch.mm(g, weight, out=grad_h[s : s + rows])
        ctx.grad_h = grad_h
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_h is None:
            return None, None, None, None, None, None, None
        return ctx.grad_h * grad.to(ctx.grad_h.dtype), None, None, None, None, None, None


def chunked_loss(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, config,
                 chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed loss, token count)`` of final hidden states ``(B, T, H)`` against *unshifted* labels."""
    weight, bias = head.weight, getattr(head, "bias", None)
    if _head_trains(head):
        raise ValueError("usaf.engine.loss.chunked_loss needs a frozen output head")
    vocab = weight.shape[0]
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    keep = shift != IGNORE_INDEX
    h = hidden.reshape(-1, hidden.shape[-1])
    if not bool(keep.all()):  # positions without a target need no logits at all
        h, shift = h[keep], shift[keep]
    rows = max(MIN_ROWS, chunk_bytes // (4 * vocab))
    scaling, cap = logit_post(config)
    total = _ChunkedCrossEntropy.apply(h, weight, bias, shift, scaling, cap, rows)
    return total, keep.sum()


@contextlib.contextmanager
def capture_head_input(model: torch.nn.Module):
    """Run ``model`` with its output head replaced by a capture of its input (the final hidden states).

    The head returns a 1-wide slice instead of logits, so the model's own post-processing stays cheap.
    Yields a dict whose ``"hidden"`` is set by the forward.
    """
    head = model.get_output_embeddings()
    box: dict = {}

    def forward(x):
        box["hidden"] = x
        return x[..., :1]

    head.forward = forward
    try:
        yield box
    finally:
        del head.forward


def _head_trains(head) -> bool:
    bias = getattr(head, "bias", None)
    return torch.is_grad_enabled() and (head.weight.requires_grad or (bias is not None and bias.requires_grad))


def token_weighted_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed causal-LM cross-entropy and the number of tokens it covers, from full logits.

    Computed exactly like transformers' ``ForCausalLMLoss``: logits upcast to fp32, labels shifted left by
    one (position ``t`` predicts ``labels[t + 1]``), ``-100`` ignored. Returns ``(sum_loss, n_tokens)`` as 0-d
    tensors (fp32 and int64) on ``logits``' device, so the mean is ``sum_loss / n_tokens`` and, over many
    batches, perplexity is ``exp(sum of sums / sum of counts)`` (token-weighted, not batch-weighted).
    """
    vocab = logits.shape[-1]
    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(logits.device)
    sum_loss = F.cross_entropy(
        logits.float().reshape(-1, vocab), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    n_tokens = (shift_labels != IGNORE_INDEX).sum()
    return sum_loss, n_tokens


def lm_loss(model: torch.nn.Module, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed causal-LM loss and token count of a collated batch (frozen-prefix cache aware).

    Chunked when the output head is frozen (or no gradient is taken); from full logits otherwise."""
    if _head_trains(model.get_output_embeddings()):
        return token_weighted_loss(logits_of(model, batch, device), batch["labels"].to(device))
    with capture_head_input(model) as box:
        logits_of(model, batch, device)
    head = model.get_output_embeddings()
    return chunked_loss(box["hidden"], head, batch["labels"].to(device), model.config)


def token_mean_loss(model: torch.nn.Module, batch: dict, n_tokens: int | None = None) -> torch.Tensor:
    """The training loss of a batch: its summed token loss (:func:`lm_loss`) over its loss tokens, or over
    ``n_tokens`` (the loss tokens of a whole step: every micro-batch of every rank). Used by training,
    selection, reselection and the benchmarks alike."""
    if "attention_mask" not in batch:
        batch = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    s, n = lm_loss(model, batch, compute_device(model))
    return s / (n.clamp(min=1) if n_tokens is None else max(n_tokens, 1))
