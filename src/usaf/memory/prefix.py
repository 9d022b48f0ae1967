"""The frozen-prefix cache: hidden states entering the first trainable layer, computed once.

Layers below the first trainable layer never change, so their output for a given sequence is a constant.
``PrefixCache.build`` runs them once under no_grad for every training and eval sequence and stores the
hidden states on disk (a flat memmap, compute dtype, one row per real token), keyed by the base model's
fingerprint, the token ids of the data, the layer and the dtype, so epochs and later runs reuse it. After
that the training forward starts at the first trainable layer (``usaf.engine.forward``) and the frozen layers
below need no residency at all (``release_prefix``). The ``.json`` beside the cache records the sha256 of
its ``.bin``; a cache that no longer matches it is rebuilt (a warning names it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..data.batches import collate
from ..data.examples import Example
from ..engine.forward import prefix_hidden, suffix_matches
from ..engine.model import UsafModel, compute_device, decoder_layers
from ..integrity import file_checksum
from ..io import atomic_write_json, cache_dir
from ..load.mmap import evict
from ..progress import progress_bar

log = logging.getLogger("usaf")

PROBE_TOKENS = 32  # tokens of the first probe sequence of ``enable_prefix_cache`` (the second has half)


class PrefixCache:
    """Per-example hidden states at the input of layer ``start``: a flat (tokens, H) memmap + offsets."""

    def __init__(self, path: Path, start: int, offsets: np.ndarray, hidden: int, dtype: torch.dtype):
        self.path, self.start, self.offsets, self.hidden, self.dtype = path, start, offsets, hidden, dtype
        self.data = np.memmap(path, dtype=np.uint16 if dtype in (torch.bfloat16, torch.float16) else np.float32,
                              mode="r", shape=(int(offsets[-1]), hidden))

    def batch(self, index: torch.Tensor, width: int) -> torch.Tensor:
        """Right-padded (B, width, H) hidden states of examples ``index``."""
        out = torch.zeros(len(index), width, self.hidden, dtype=self.dtype)
        for row, i in enumerate(index.tolist()):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            t = torch.from_numpy(np.array(self.data[a:b]))  # a private copy of the rows
            out[row, : b - a] = t.view(self.dtype) if self.dtype != torch.float32 else t
        return out

    @staticmethod
    def key(handle: UsafModel, examples, start: int, dtype) -> str:
        h = hashlib.sha256(f"{handle.fingerprint}|{start}|{dtype}".encode())
        for ex in examples:
            h.update(np.asarray(ex.input_ids, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:24]

    @classmethod
    def build(cls, handle: UsafModel, examples, start: int, batch_size: int, pad_id: int,
              cache_root: Path | None = None) -> PrefixCache:
        """Compute (or reuse) the cache for ``examples`` in order."""
        model = handle.model
        device = compute_device(model)
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        hidden = model.config.get_text_config().hidden_size
        root = cache_root or cache_dir("prefix", "USAF_PREFIX_CACHE")
        root.mkdir(parents=True, exist_ok=True)
        key = cls.key(handle, examples, start, dtype)
        path, meta = root / f"{key}.bin", root / f"{key}.json"
        lengths = np.array([len(ex.input_ids) for ex in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if path.exists() and meta.exists():
            try:
                good = json.loads(meta.read_text()).get("sha256") == file_checksum(path)
            except (OSError, ValueError, AttributeError):
                good = False
            if good:
                return cls(path, start, offsets, hidden, dtype)
            log.warning("frozen-prefix cache %s is damaged (it does not match its checksum); rebuilding it", path)
        tmp = root / f".{key}.{os.getpid()}.tmp"
        np_dtype = np.uint16 if dtype in (torch.bfloat16, torch.float16) else np.float32
        data = np.memmap(tmp, dtype=np_dtype, mode="w+", shape=(int(offsets[-1]), hidden))
        with progress_bar(len(examples), f"frozen-prefix cache (layers 0-{start - 1})", unit="seq") as bar:
            for a in range(0, len(examples), batch_size):
                chunk = examples[a : a + batch_size]
                batch = collate(chunk, pad_id)
                h = prefix_hidden(model, start, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for row, ex in enumerate(chunk):
                    i = a + row
                    v = h[row, : len(ex.input_ids)].detach().to("cpu")
                    data[offsets[i] : offsets[i + 1]] = (v.view(torch.int16) if np_dtype == np.uint16 else v).numpy()
                bar.update(len(chunk))
        data.flush()
        del data
        digest = file_checksum(tmp)
        os.replace(tmp, path)
        atomic_write_json(meta, {"start": start, "examples": len(examples), "dtype": str(dtype), "sha256": digest})
        log.info("frozen-prefix cache: %d sequences at layer %d -> %s", len(examples), start, path)
        return cls(path, start, offsets, hidden, dtype)


def first_trainable_layer(handle: UsafModel) -> int:
    return min(m.index for m in handle.trainable_layers)


@torch.no_grad()
def release_prefix(handle: UsafModel, start: int) -> int:
    """Drop the weights of the frozen layers below ``start`` (they are not run any more), and the input
    embeddings unless the LM head shares them: the forward from the cache enters at layer ``start`` with
    the cached states as ``inputs_embeds``. On a GPU they are the vocabulary x hidden matrix the device would
    otherwise keep (594 MB at Qwen3-30B-A3B's widths in bf16). Returns bytes freed."""
    if start <= 0:
        return 0
    freed = 0
    model = handle.model
    layers = decoder_layers(model)
    for m in handle.layers:
        if m.index < start:
            for s in m.experts.release():
                freed += s.nbytes()
                evict(s)
    for layer in list(layers)[:start]:
        freed += sum(p.numel() * p.element_size() for p in layer.parameters())
        layer.to("meta")
    try:
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (NotImplementedError, AttributeError):  # a model that does not say which they are: kept
        embed = head = None
    shared = getattr(head, "weight", None)
    if embed is not None and not (shared is not None and shared is getattr(embed, "weight", None)):
        freed += sum(p.numel() * p.element_size() for p in embed.parameters() if p.device.type != "meta")
        embed.to("meta")
    return freed




def offset_index(batches, k: int):
    """Shift the ``index`` of each batch by ``k`` (eval rows follow the train rows in the cache)."""
    for b in batches:
        b["index"] = b["index"] + k
        yield b


def prefix_pays_off(n_train: int, n_eval: int, visits: int, evaluations: int = 2) -> bool:
    """Whether building the cache is worth it: it runs the frozen prefix once for every training and eval
    sequence, while without it the prefix runs once per visit of a training sequence and per evaluation of an
    eval sequence. A run of 10 steps on a dataset of millions of sequences would otherwise spend hours (and
    gigabytes of disk) on hidden states it never reads."""
    return visits + evaluations * n_eval >= n_train + n_eval


def enable_prefix_cache(handle: UsafModel, train_ex, eval_ex, batch_size: int, pad_id: int) -> bool:
    """Build the cache for ``train_ex + eval_ex`` when the first trainable layer is above 0 and the family
    reproduces the full forward from cached states; then release the frozen prefix. Returns whether on."""
    start = first_trainable_layer(handle)
    if start == 0:
        return False
    model = handle.model
    device = compute_device(model)
    # The probe is short: whether the family reproduces the full forward from cached states does not depend
    # on the length, and at full width two 512-token sequences cost five full forwards (3 minutes for
    # 16 layers of Qwen3-30B-A3B's widths on 2 cores). Two lengths, so that padding is in the probe.
    probe = collate([Example(ex.input_ids[:n], ex.labels[:n]) for ex, n in zip(train_ex[:2], (PROBE_TOKENS,
                                                                                            PROBE_TOKENS // 2))],
                    pad_id)
    with progress_bar(7, "frozen-prefix cache: checking the suffix forward", unit="forward") as bar:
        ok = suffix_matches(model, start, probe["input_ids"].to(device), probe["attention_mask"].to(device), bar)
    if not ok:
        return False
    cache = PrefixCache.build(handle, list(train_ex) + list(eval_ex), start, batch_size, pad_id)
    freed = release_prefix(handle, start)
    model.usaf_prefix = cache
    log.info("frozen-prefix cache on: layers 0-%d run once; %.1f MB of their weights released", start - 1,
             freed / 2**20)
    return True
