"""``usaf chat``: talk to a model (with a trained delta) in the terminal, several turns, tokens streamed.

The conversation is rendered with the tokenizer's chat template before every reply (so the model sees the
whole history, its own earlier answers included); generation stops at the end-of-turn token the template
writes after an assistant message, or at eos. ``/reset`` starts a new conversation, ``/exit`` (or Ctrl-D)
quits. A tokenizer without a chat template falls back to plain completion: each line is continued on its
own, without history (said once, at the start).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from transformers import TextStreamer

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits"


class _Echo(TextStreamer):
    """Writes each piece of decoded text to ``out`` as soon as it is final (whole words; all at the end)."""

    def __init__(self, tokenizer, out):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


def _ids(x) -> list[int]:
    if hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(i) for i in (x.tolist() if hasattr(x, "tolist") else x)]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: eos, and the first special token the chat template writes after an
    assistant message's content (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...)."""
    ids = {tokenizer.eos_token_id} - {None}
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": "hi"}]
        prompt = _ids(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True))
        full = _ids(tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "ok"}], tokenize=True))
        special = set(tokenizer.all_special_ids)
        n = 0
        while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
            n += 1
        ids |= set(next(([t] for t in full[n:] if t in special), []))
    return sorted(ids)


class ChatSession:
    """One conversation with ``model``; :meth:`reply` streams the answer to ``out`` and returns it."""

    def __init__(self, model, tokenizer, *, temperature: float = 0.7, top_p: float = 0.9,
                 max_new_tokens: int = 256, system: str = "", out=None):
        self.model, self.tok, self.out = model, tokenizer, out or sys.stdout
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.system = system
        self.history: list[dict] = []
        self.gen = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                    "eos_token_id": end_of_turn_ids(tokenizer),
                    "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                    else tokenizer.eos_token_id}
        if temperature > 0:
            self.gen.update(temperature=temperature, top_p=top_p)

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, text: str) -> list[int]:
        if not self.templated:
            return _ids(self.tok(text)["input_ids"])
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        msgs = msgs + [{"role": "user", "content": text}]
        return _ids(self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True))

    @torch.no_grad()
    def reply(self, text: str) -> str:
        device = next(self.model.parameters()).device
        ids = torch.tensor([self.prompt_ids(text)], device=device)
        self.model.eval()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=_Echo(self.tok, self.out),
                                  **self.gen)
        answer = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if self.templated:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]
        return answer


def run_chat(session: ChatSession, read_line: Callable[[str], str] = input, err=None) -> None:
    """The terminal loop: read a line, answer it (streamed), until ``/exit`` or end of input."""
    out, err = session.out, err or sys.stderr
    if not session.templated:
        err.write("usaf: note: the tokenizer has no chat template: plain completion (each line is continued on "
                  "its own, without history)\n")
    out.write(f"usaf chat: {HELP}\n")
    out.flush()
    while True:
        try:
            line = read_line("you> ").strip()
        except EOFError:
            out.write("\n")
            break
        if line == "/exit":
            break
        if line == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            continue
        if not line:
            continue
        out.write("model> ")
        out.flush()
        session.reply(line)
        out.write("\n")
        out.flush()
