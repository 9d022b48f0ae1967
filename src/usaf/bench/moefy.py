"""A test bed whose experts differ and whose routing matters: SmolLM2-135M-Instruct "MoEfied", offline.

MoEfication (Zhang et al., 2022) splits each dense MLP's neurons into groups that tend to fire together;
each group becomes an expert and a router, fitted on calibration text, picks the groups that carry most of
a token's MLP output. The upcycled bed (:mod:`usaf.bench.upcycle`) has identical experts, so its router's
gradient is exactly zero; here the experts are disjoint slices of the MLP and both the choice of experts and
their weights change the output.

The model is a Qwen2-MoE (its attention with ``qkv_bias=False`` is Llama's). Only the top ``moe_layers``
decoder layers (default 8: the layers the quality bench trains) become MoE layers; the others keep the dense
MLP exactly (``mlp_only_layers``). In each MoE layer (``split_layer``):

1. On calibration text (general English quotations and Python documentation *training* files, none of the
   bench's held-out text), record the MLP input ``x`` and the neuron activations ``a = silu(g·x) * (u·x)``.
2. The ``shared`` fraction of neurons with the largest mean output contribution becomes the shared expert
   (its sigmoid gate is zeroed: ``sigmoid(0) = 0.5`` exactly, so its ``down_proj`` is doubled).
3. The other neurons are clustered into ``E`` groups of equal size by co-activation: each neuron is described
   by its centred, unit-norm ``|a|`` over the calibration tokens; balanced spherical k-means.
4. The target of expert ``e`` on a token is the norm of its output ``‖down[:, g_e] · a[g_e]‖``, standardized
   over the experts of the token. A ridge regression from ``x`` gives the router weight ``W [E, H]`` (the
   router has no bias); its top-k picks the experts.
5. The top-k softmax weights are renormalized to sum to one (``norm_topk_prob``), so every routed
   ``down_proj`` is multiplied by ``k`` and the router is scaled so that its logits have a small spread
   (``logit_std``): the weights stay near ``1/k`` (the layer stays close to the shared expert plus the chosen
   slices), but they are not equal, so the output depends on the router (non-zero gradient) as well as on
   the choice.

The cost of routing (held-out perplexity of the MoE against the dense model) is measured when the bed is
built and kept in its marker file (``routing_cost``); docs/quality.md reports it.
"""

from __future__ import annotations

import copy
import logging
import random
import re
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from ..data.batches import collate
from ..data.load import load_examples
from ..train.evaluate import evaluate
from .corpora import GENERAL_FILES, domain_documents, find_corpora, held_out, write_task_files
from .upcycle import (
    _default_cache_root,
    _fingerprint,
    _is_complete,
    _moe_config,
    find_smollm2_gguf,
    load_smollm2_dense,
    write_cached_checkpoint,
)

logger = logging.getLogger(__name__)

#: Bump when the recipe changes (invalidates cached beds).
MOEFY_FORMAT_VERSION = 1
#: The bed's recipe (chosen by held-out perplexity among 16/32 experts, top 25-50%, shared 0-50%, logit spread
#: 0.1-1.0: docs/quality.md).
DEFAULTS = {"num_experts": 16, "top_k": 4, "shared": 0.5, "moe_layers": 8, "logit_std": 0.1, "calib_seqs": 32,
            "seq": 256, "seed": 0}


# --------------------------------------------------------------------------------------------- calibration
def calibration_texts(seed: int = 0) -> list[str]:
    """General English (the ``fortunes`` files *not* used for the bench's general eval) and the Python
    documentation files of the bench's training split, shuffled: text the bench never evaluates on."""
    docs, fortunes = find_corpora()
    general = []
    for p in sorted(fortunes.iterdir()):
        if p.suffix or p.name in GENERAL_FILES or "art" in p.name or "off" in p.name or not p.is_file():
            continue
        entries = re.split(r"^%\s*$", p.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        general += [e.strip() for e in entries if len(e.strip()) > 40]
    domain = [t for n, t in domain_documents(docs) if not held_out(n, 0.1, seed)]
    random.Random(seed).shuffle(general)
    random.Random(seed + 1).shuffle(domain)
    return ["\n\n".join(general), "\n\n".join(domain[:200])]


def calibration_batch(tokenizer, n_seqs: int, seq: int, seed: int = 0) -> torch.Tensor:
    """``[n_seqs, seq]`` token ids: half general text, half documentation."""
    out = []
    for i, text in enumerate(calibration_texts(seed)):
        want = n_seqs // 2 if i == 0 else n_seqs - n_seqs // 2
        ids = tokenizer(text)["input_ids"]
        if len(ids) < want * seq:
            raise ValueError(f"calibration text too short: {len(ids)} tokens for {want} x {seq}")
        out += [ids[j * seq : (j + 1) * seq] for j in range(want)]
    return torch.tensor(out)


@torch.no_grad()
def mlp_inputs(dense, ids: torch.Tensor, batch: int = 8, layers=None) -> list[torch.Tensor]:
    """The input of the MLP (post-attention norm output) of each of ``layers`` (default all), ``[tokens, H]``."""
    layers = list(range(len(dense.model.layers)) if layers is None else layers)
    caps: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [dense.model.layers[i].mlp.register_forward_hook(
        lambda m, inp, out, j=j: caps[j].append(inp[0].reshape(-1, inp[0].shape[-1]).float()))
        for j, i in enumerate(layers)]
    try:
        for b in ids.split(batch):
            dense(input_ids=b)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c) for c in caps]


# --------------------------------------------------------------------------------------------- splitting
def balanced_kmeans(features: torch.Tensor, groups: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Spherical k-means of the rows of ``features`` (unit norm) into ``groups`` groups of equal size.

    Each assignment step is greedy over all (row, centroid) pairs by decreasing similarity, skipping full
    groups. Returns the group of every row (``[n]`` long).
    """
    n = features.shape[0]
    if n % groups:
        raise ValueError(f"{n} neurons do not split into {groups} equal experts")
    cap = n // groups
    g = torch.Generator().manual_seed(seed)
    cent = features[torch.randperm(n, generator=g)[:groups]].clone()
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        order = torch.argsort((features @ cent.T).reshape(-1), descending=True).tolist()
        got, count, left = [-1] * n, [0] * groups, n
        for idx in order:
            j, e = divmod(idx, groups)
            if got[j] >= 0 or count[e] >= cap:
                continue
            got[j], count[e], left = e, count[e] + 1, left - 1
            if not left:
                break
        assign = torch.tensor(got)
        new = torch.stack([F.normalize(features[assign == e].mean(0), dim=0) for e in range(groups)])
        if torch.allclose(new, cent):
            break
        cent = new
    return assign


def split_layer(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, num_experts: int,
                top_k: int, shared: float, logit_std: float, seed: int = 0) -> dict:
    """One dense SwiGLU MLP (``gate``/``up`` ``[I, H]``, ``down`` ``[H, I]``) -> a shared expert (the
    ``shared`` fraction of neurons with the largest mean output contribution), routed expert stacks of the
    others, and a router fitted on the MLP inputs ``x`` ``[N, H]``.

    Also returns ``recall`` (the mean share of the oracle top-k routed output norm that the fitted router's
    top-k picks on ``x``) and ``rel_err`` (``‖routed MoE − dense MLP‖ / ‖dense MLP‖`` on ``x``, with equal
    weights).
    """
    a = F.silu(x @ gate.T) * (x @ up.T)  # [N, I]
    n = a.shape[1]
    order = (a.abs() * down.norm(dim=0)).mean(0).argsort(descending=True)
    n_shared = int(round(n * shared / num_experts)) * num_experts if shared else 0
    sh, rest = order[:n_shared], order[n_shared:]
    if len(rest) % num_experts:
        raise ValueError(f"{len(rest)} routed neurons do not split into {num_experts} equal experts")
    feat = a[:, rest].abs().T
    feat = F.normalize(feat - feat.mean(1, keepdim=True), dim=1)
    assign = balanced_kmeans(feat, num_experts, seed=seed)
    groups = [rest[assign == e] for e in range(num_experts)]
    outs = torch.stack([a[:, g] @ down[:, g].T for g in groups], 1)  # [N, E, H]
    mass = outs.norm(dim=2)
    target = (mass - mass.mean(1, keepdim=True)) / (mass.std(1, keepdim=True) + 1e-6)
    ridge = 1e-2 * float(x.pow(2).mean()) * x.shape[0]
    w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ target).T  # [E, H]
    logits = x @ w.T
    top = logits.topk(top_k, dim=1).indices
    picked = mass.gather(1, top).sum(1)
    recall = float((picked / mass.topk(top_k, dim=1).values.sum(1)).mean())
    y = a @ down.T
    routed = outs.gather(1, top[..., None].expand(-1, -1, outs.shape[2])).sum(1)
    y_moe = routed + (a[:, sh] @ down[:, sh].T if n_shared else 0)
    return {
        "router": w * (logit_std / float(logits.std())),
        "gate_up": torch.stack([torch.cat([gate[g], up[g]]) for g in groups]),  # [E, 2I', H]
        "down": torch.stack([down[:, g] for g in groups]) * top_k,  # [E, H, I']
        "shared": (gate[sh], up[sh], down[:, sh]),
        "recall": recall,
        "rel_err": float((y_moe - y).norm() / y.norm()),
    }


def moefy_config(dense_config, num_experts: int, top_k: int, expert_width: int, shared_width: int, moe_layers):
    """Qwen2-MoE config: attention and embeddings of the dense Llama (``qkv_bias=False``), dense MLPs in every
    layer outside ``moe_layers`` (``mlp_only_layers``), routed experts of ``expert_width`` neurons with
    renormalized top-k weights and a gated shared expert in the others."""
    config = _moe_config(dense_config, "qwen2_moe", num_experts, top_k)
    config.moe_intermediate_size = expert_width
    config.shared_expert_intermediate_size = shared_width
    config.mlp_only_layers = [i for i in range(dense_config.num_hidden_layers) if i not in moe_layers]
    return config


def moefy_dense_to_moe(dense, calib_ids: torch.Tensor, num_experts: int = 16, top_k: int = 8, shared: float = 0.25,
                       moe_layers: int = 8, logit_std: float = 0.1, dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0):
    """A Qwen2-MoE whose top ``moe_layers`` decoder layers route co-activation groups of ``dense``'s MLP neurons
    (module doc); the other layers keep the dense MLP exactly.

    Returns ``(moe, stats)``: the model in eval mode, and per MoE layer its router recall and relative error.
    """
    dc = dense.config
    n_layers, width = dc.num_hidden_layers, dc.intermediate_size
    if not 1 <= top_k <= num_experts or not 1 <= moe_layers <= n_layers or not 0 <= shared < 1:
        raise ValueError("need 1 <= top_k <= num_experts, 1 <= moe_layers <= layers and 0 <= shared < 1")
    n_shared = int(round(width * shared / num_experts)) * num_experts if shared else 0
    if (width - n_shared) % num_experts:
        raise ValueError(f"{width - n_shared} routed neurons do not split into {num_experts} equal experts")
    layers = range(n_layers - moe_layers, n_layers)
    config = moefy_config(dc, num_experts, top_k, (width - n_shared) // num_experts, max(n_shared, 1), layers)
    with no_init_weights():
        moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    src = {k: v.detach().float() for k, v in dense.state_dict().items()}
    dst = moe.state_dict()
    stats = []
    with torch.no_grad():
        for k, v in src.items():
            if k in dst and (".mlp." not in k or int(k.split(".")[2]) not in layers):
                dst[k].copy_(v)
        inputs = mlp_inputs(dense, calib_ids, layers=layers)
        for i in layers:
            p = f"model.layers.{i}.mlp"
            part = split_layer(inputs.pop(0), src[f"{p}.gate_proj.weight"], src[f"{p}.up_proj.weight"],
                               src[f"{p}.down_proj.weight"], num_experts, top_k, shared, logit_std, seed + i)
            dst[f"{p}.gate.weight"].copy_(part["router"])
            dst[f"{p}.experts.gate_up_proj"].copy_(part["gate_up"])
            dst[f"{p}.experts.down_proj"].copy_(part["down"])
            g, u, d = part["shared"]
            if n_shared:  # sigmoid(0) = 0.5 exactly: the shared expert's down is doubled
                dst[f"{p}.shared_expert.gate_proj.weight"].copy_(g)
                dst[f"{p}.shared_expert.up_proj.weight"].copy_(u)
                dst[f"{p}.shared_expert.down_proj.weight"].copy_(d * 2)
            else:  # a one-neuron shared expert that outputs zero
                for n in ("gate_proj", "up_proj", "down_proj"):
                    dst[f"{p}.shared_expert.{n}.weight"].zero_()
            dst[f"{p}.shared_expert_gate.weight"].zero_()
            stats.append({"layer": i, "recall": round(part["recall"], 4), "rel_err": round(part["rel_err"], 4)})
    moe.tie_weights()
    moe.generation_config = dense.generation_config
    return moe.to(dtype).eval(), stats


# --------------------------------------------------------------------------------------------- cost + cache
def routing_cost(dense, moe, tokenizer, seq: int = 256, n_seqs: int = 32, seed: int = 0) -> dict:
    """Held-out perplexity of ``dense`` and ``moe`` (both bf16, as the bench runs them) on the bench's in-domain
    and general eval sets."""
    out = {}
    dense_bf16 = copy.deepcopy(dense).to(moe.dtype)
    with tempfile.TemporaryDirectory(prefix="usaf-moefy-") as d:
        files = write_task_files(Path(d), seed=seed)
        for role in ("domain_eval", "general_eval"):
            ex, _ = load_examples(files[role], tokenizer, seq)
            random.Random(f"usaf-quality:{seed}:{role}.jsonl").shuffle(ex)
            ex = ex[:n_seqs]
            batches = [collate(ex[i : i + 4], tokenizer.pad_token_id) for i in range(0, len(ex), 4)]
            out[role] = {"dense": round(evaluate(dense_bf16, batches)["ppl"], 4),
                         "moe": round(evaluate(moe, batches)["ppl"], 4)}
    return out


def moefied_smollm2_name(num_experts: int, top_k: int) -> str:
    return f"smollm2-135m-moefy-qwen2_moe-e{num_experts}k{top_k}"


def prepare_moefied_smollm2(cache_dir: Path | str | None = None, **recipe) -> Path:
    """Build (once) and return the cached MoEfied SmolLM2 checkpoint (bf16, Qwen2-MoE layout; about 5 minutes
    on 2 CPU cores), like :func:`usaf.bench.upcycle.prepare_upcycled_smollm2`."""
    r = dict(DEFAULTS, **recipe)
    gguf = find_smollm2_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_root()
    target = root / moefied_smollm2_name(r["num_experts"], r["top_k"])
    fingerprint = _fingerprint(gguf, recipe="moefy", moefy_version=MOEFY_FORMAT_VERSION, **r)
    if _is_complete(target, fingerprint):
        return target
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dense, tokenizer = load_smollm2_dense(torch.float32)
    ids = calibration_batch(tokenizer, r["calib_seqs"], r["seq"], r["seed"])
    moe, stats = moefy_dense_to_moe(dense, ids, r["num_experts"], r["top_k"], r["shared"], r["moe_layers"],
                                    r["logit_std"], seed=r["seed"])
    cost = routing_cost(dense, moe, tokenizer, seed=r["seed"])
    del dense
    logger.info("moefied SmolLM2 (E=%d, k=%d) in %.0f s; routing cost %s", r["num_experts"], r["top_k"],
                time.perf_counter() - start, cost)
    write_cached_checkpoint(moe, tokenizer, target, fingerprint,
                            {"usaf_moefy.json": {"routing_cost": cost, "layers": stats, **r}})
    return target
