"""Text generation for ``usaf generate`` and the demo (chat template when the tokenizer has one)."""

from __future__ import annotations

import torch


def render_prompt(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt)["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0) -> str:
    """Greedy (temperature 0) or sampled continuation of ``prompt``; returns the new text only."""
    device = next(model.parameters()).device
    ids = torch.tensor([render_prompt(tokenizer, prompt)], device=device)
    kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    if temperature > 0:
        kwargs["temperature"] = temperature
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
