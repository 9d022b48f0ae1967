"""Placing frozen expert stacks on tiers, and prefetching the next layer while one computes.

Tiers: ``device`` (the compute device), ``host`` (RAM) or ``disk`` (the mmap of the quantized cache,
paged in on use). ``choose_tier`` places the stacks from the memory budgets; ``Prefetcher`` hooks every
decoder layer so that, while layer l computes, layer l+1's frozen stacks are brought closer: on CPU a
thread touches their pages (the kernel reads them from disk), on CUDA their host copies are sent to the
device on a side stream from pinned memory (the CUDA path is untested here: no GPU was available).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import psutil
import torch

from ..engine.ggml import GGMLStack
from ..engine.model import UsafModel, compute_device, decoder_layers
from ..engine.quant import QuantizedTensor
from ..engine.store import DenseStack
from ..units import parse_bytes
from .mmap import evict, is_mapped

log = logging.getLogger("usaf")


def choose_tier(expert_bytes: int, device, device_memory=None, host_memory=None, in_file: bool = False) -> str:
    """Where the frozen expert stacks go: the fastest tier that holds them with room to spare. ``in_file``: the
    stacks are already a file in the store's format (a GGUF); on the CPU they then stay mapped (disk), since a
    copy in RAM would only hold the page cache's bytes a second time."""
    device = torch.device(device)
    if in_file and device.type == "cpu":
        return "disk"
    host = parse_bytes(host_memory) or psutil.virtual_memory().available
    if device.type == "cuda":
        dev = parse_bytes(device_memory) or torch.cuda.mem_get_info(device)[0]
        if expert_bytes < 0.6 * dev:
            return "device"
    elif parse_bytes(device_memory):
        host = min(host, parse_bytes(device_memory))
    return "host" if expert_bytes < 0.6 * host else "disk"


class Prefetcher:
    """While decoder layer l runs, bring layer l+1's frozen expert stacks closer (see module docstring)."""

    def __init__(self, handle: UsafModel, device=None, touch: bool = True):
        """``touch=False``: on CPU, no read-ahead of the next layer (only the pages a forward uses are read,
        e.g. the two hit experts of a generated token); frozen disk-tier layers still give their pages back."""
        self.handle = handle
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usaf-prefetch")
        self.device = torch.device(device) if device is not None else compute_device(handle.model)
        self.stream = None
        self.pending: dict = {}  # id(layer) -> the read-ahead future of its pages (CPU)
        layers = decoder_layers(handle.model)
        moe = {m.index: m for m in handle.layers}
        order = sorted(moe)
        self.hooks = []
        if self.device.type == "cuda":
            # Host-tier stacks are pinned once, so the side-stream copies are asynchronous.
            self.stream = torch.cuda.Stream(self.device)
            for m in handle.layers:
                for name, st in m.experts.frozen.items():
                    ts = st.tensors()
                    if ts and next(iter(ts.values())).device.type == "cpu":
                        m.experts.frozen[name] = _pinned(st)
            for i in order:  # a staged copy lives until its layer's forward is done
                self.hooks.append(layers[i].register_forward_hook(lambda mod, a, out, _m=moe[i]: self._unstage(_m)))
        for i, nxt in zip(order, order[1:]) if touch or self.stream is not None else ():
            self.hooks.append(layers[i].register_forward_pre_hook(
                lambda mod, args, _m=moe[nxt]: self._prefetch(_m)))
        for i in order:  # frozen layers on the disk tier give their pages back after use
            if not moe[i].trainable:
                self.hooks.append(layers[i].register_forward_hook(lambda mod, a, out, _m=moe[i]: self._evict(_m)))
            elif self.stream is None and any(is_mapped(s) for s in moe[i].experts.frozen.values()):
                # trainable layers on the disk tier too, after each pass (forward, backward): their pages are
                # read again from the page cache on the next use
                moe[i].experts.after_pass = lambda _m=moe[i]: self._evict(_m)

    def _prefetch(self, layer) -> None:
        tensors = [t for s in layer.experts.frozen.values() for t in s.tensors().values()]
        if not tensors:
            return
        if tensors[0].device.type != "cpu":
            return
        if self.stream is None:
            self.pending[id(layer)] = self.pool.submit(_touch, tensors)
            return
        # CUDA: copy the next layer's host stacks to the device on the side stream (tests/test_cuda.py).
        # The caching allocator must not hand the copies' memory to the compute stream before they are used.
        with torch.cuda.stream(self.stream):
            staged = {name: st.to(self.device, non_blocking=True) for name, st in layer.experts.frozen.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        compute = torch.cuda.current_stream(self.device)
        for st in staged.values():
            for t in st.tensors().values():
                t.record_stream(compute)
        layer.experts.set_mode(staged=(staged, event))

    def _unstage(self, layer) -> None:
        layer.experts.set_mode(staged=None)

    def _evict(self, layer) -> None:
        if layer.experts.merged:  # merged deltas live in the map's copy-on-write pages: dropping them would lose them
            return
        # A read-ahead of this layer still queued or running would page it back in after the eviction (a
        # layer skipped by the suffix forward returns at once): cancel it, or wait for it, first.
        touch = self.pending.pop(id(layer), None)
        if touch is not None and not touch.cancel():
            touch.result()
        for s in layer.experts.frozen.values():
            evict(s)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        for m in self.handle.layers:
            m.experts.set_mode(staged=None)
            m.experts.after_pass = None
        self.pool.shutdown(wait=True)


def _pinned(stack):
    """The same frozen stack with its host tensors in page-locked memory."""
    if isinstance(stack, DenseStack):
        return DenseStack(stack.tensor.pin_memory())
    if isinstance(stack, (QuantizedTensor, GGMLStack)):
        return stack.to_pinned()
    return stack


def _touch(tensors: list[torch.Tensor]) -> None:
    """Read one byte per 4 KiB page of each tensor, so the kernel pages it in (mmap tier)."""
    for t in tensors:
        flat = t.reshape(-1).view(torch.uint8) if t.is_contiguous() else t.reshape(-1)
        flat[:: 4096].sum()
