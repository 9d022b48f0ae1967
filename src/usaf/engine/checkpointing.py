"""Activation checkpointing at decoder-layer boundaries, with the experts in their lean mode.

transformers' own non-reentrant layer checkpointing recomputes a layer's forward in the backward. usaf's
experts keep the layer input on ``ctx`` (outside the checkpoint's saved tensors), so the recomputation stops
after the router, the last op that saved a tensor, and never re-runs or re-dequantizes the experts; in their
lean mode the experts recompute their gate/up pre-activations in their own backward. Whether a run uses it
is decided once at setup (``usaf.train``, from the memory plan) and passed down; scoring passes always do
(:func:`lean_passes`).
"""

from __future__ import annotations

import contextlib

from .model import UsafModel


def enable_checkpointing(handle: UsafModel) -> None:
    """Checkpoint every decoder layer; experts lean (keep the layer input and routing only)."""
    model = handle.model
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also makes the input embeddings' output require grad (for reentrant checkpointing and
    # PEFT); with non-reentrant checkpointing that only makes autograd run the backward of every frozen layer
    # below the trainable range (measured: 3.1 s instead of 1.9 s per step on the quality bench model).
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    for m in handle.layers:
        m.experts.set_mode(lean=True)


def disable_checkpointing(handle: UsafModel) -> None:
    """Undo :func:`enable_checkpointing`."""
    model = handle.model
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    for m in handle.layers:
        m.experts.set_mode(lean=False)


def is_checkpointing(handle: UsafModel) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in handle.model.modules())


def can_checkpoint(handle: UsafModel) -> bool:
    """Whether transformers can checkpoint the model's layers (``supports_gradient_checkpointing``; jetmoe not)."""
    return bool(getattr(handle.model, "supports_gradient_checkpointing", True))


@contextlib.contextmanager
def lean_passes(handle: UsafModel):
    """Checkpointing (lean experts) for the duration of the block, restored after: selection and
    reselection passes use it whatever the training steps do, so that scoring stays within the memory of a
    training step (their dense score buffers come on top of the activations). It costs them some time.
    A model whose layers transformers cannot checkpoint (jetmoe) scores with lean experts only."""
    was = is_checkpointing(handle)
    if not was and not can_checkpoint(handle):
        modes = [m.experts.set_mode(lean=True) for m in handle.layers]
        try:
            yield
        finally:
            for m, mode in zip(handle.layers, modes):
                m.experts.set_mode(lean=mode.lean)
        return
    if not was:
        enable_checkpointing(handle)
    try:
        yield
    finally:
        if not was:
            disable_checkpointing(handle)
