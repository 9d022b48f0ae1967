"""What a run reads before any weight: the model's config and tokenizer, the data, its held-out split, and
the identities (content digests) that a resumed run must match."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..data.batches import split_eval
from ..data.examples import Example
from ..data.store import load_stored
from ..engine.model import parse_layers
from ..load.hf import check_model, load_tokenizer, resolve_device, resolve_dtype
from . import distributed
from .resume import config_digest, examples_digest

log = logging.getLogger("usaf")


@dataclass
class Inputs:
    device: torch.device
    dtype: torch.dtype
    tokenizer: object
    pad_id: int
    train: Sequence[Example]  # read lazily from the token store (usaf.data.store)
    eval: Sequence[Example]
    stats: object  # DataStats of --data
    identity: dict  # content digests: model config, data, eval data, tokens (+ base fingerprint, later)


def read_inputs(cfg: TrainConfig, d: distributed.Dist) -> Inputs:
    """Check the model (config, family, files) and read the tokenizer and data; raises one-line errors."""
    model_cfg = check_model(cfg.model, cfg.trust_remote_code)
    parse_layers(cfg.usaf.train_layers, model_cfg.get_text_config().num_hidden_layers)
    device = resolve_device(distributed.device_for(d, cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    progress = False if cfg.quiet or not d.main else None  # the tokenizing bar: on a terminal
    data = load_stored(cfg.data, tok, cfg.seq_len, progress=progress)
    examples, stats = data.examples, data.stats
    evals = None
    if cfg.eval_data:
        train_ex = examples
        evals = load_stored(cfg.eval_data, tok, cfg.seq_len, progress=progress)
        eval_ex = evals.examples
    else:
        train_ex, eval_ex = held_out_split(examples, cfg.seed)
    log_data("data", stats, cfg.seq_len)
    if evals is not None:
        log_data("eval data", evals.stats, cfg.seq_len)
    identity = {"model_config": config_digest(model_cfg), "data": data.digest,
                "eval_data": evals.digest if evals else None,
                "tokens": examples_digest(examples, eval_ex if cfg.eval_data else [])}
    return Inputs(device, dtype, tok, pad_id(tok), train_ex, eval_ex, stats, identity)


def held_out_split(examples, seed: int):
    """``(train, eval)``: the held-out split a run takes from --data when no --eval-data is given (10%, at
    most 64 sequences, drawn with --seed); ``usaf eval --held-out`` takes the same one."""
    return split_eval(examples, fraction=0.1, seed=seed, max_eval=64)


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def log_data(what: str, stats, seq_len: int) -> None:
    log.info("%s: %s", what, stats.summary())
    if stats.truncated or stats.dropped:
        log.warning("%s: %d of %d rows longer than --seq-len %d were truncated, %d dropped (no loss token "
                    "left)", what, stats.truncated, stats.rows, seq_len, stats.dropped)
