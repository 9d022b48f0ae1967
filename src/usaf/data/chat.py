"""Conversations (``messages`` rows) -> token ids and labels on the assistant turns only.

Rendered with ``tokenizer.apply_chat_template`` (whatever bos/eos the template itself writes, nothing added).
Which tokens are "assistant tokens" is decided as follows:

1. If the chat template marks assistant output with ``{% generation %}`` blocks (and the tokenizer is a fast
   one), transformers' ``return_assistant_tokens_mask`` is used: exactly the tokens inside those blocks.
2. Otherwise (most published templates) the spans are found by **incremental prefix rendering and token
   diffing**. For each assistant message ``i`` of the tokenized full conversation ``F``:

   * start = length of the common prefix of ``F`` and the rendering of ``messages[:i]`` with
     ``add_generation_prompt=True`` - so the assistant header the template emits as generation prompt is
     *not* trained on;
   * end = length of the common prefix of ``F`` and the rendering of ``messages[:i + 1]`` - so the assistant
     content, any tool calls and the end-of-turn markup the template writes after them (e.g.
     ``<|im_end|>\\n`` for ChatML) *are* trained on: the model must learn to stop.

   Common prefixes (rather than plain lengths) keep this right when tokenization at a boundary differs.
   Some templates render the *final* assistant turn differently from earlier ones (Qwen3 adds an empty
   ``<think></think>`` block to the last turn, gpt-oss ends it with ``<|return|>`` instead of ``<|end|>``),
   so ``messages[:i + 1]`` is not a prefix of ``F``. Then the end is re-aligned on the longest common
   *suffix* of that rendering's divergent tail and ``F`` (bounded by the next assistant turn's start): the
   earlier turn still gets its content and end-of-turn tokens; at worst (no common tail, as for gpt-oss)
   the span stops where the renderings diverge.

A conversation without an assistant message, or whose assistant turns yield no token, is refused, as is a
tokenizer without a chat template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .examples import IGNORE_INDEX, RowProblem, json_type

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatEncoder:
    """Encodes ``messages`` rows with a tokenizer's chat template (checked once, on the first row)."""

    def __init__(self, tokenizer: Any, chat_template_kwargs: dict[str, Any]) -> None:
        self.tok = tokenizer
        self.chat_kwargs = chat_template_kwargs
        self._chat_checked = False
        self._use_generation_mask = False

    def encode(self, messages: Any) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation; raises ``RowProblem``."""
        return self._messages(messages)

    def _check_chat(self) -> None:
        if self._chat_checked:
            return
        template = getattr(self.tok, "chat_template", None)
        if not template:
            raise RowProblem("'messages' rows need a chat template, and the tokenizer has none")
        if isinstance(template, dict):  # named templates: the default one is used
            template = template.get("default") or next(iter(template.values()))
        self._use_generation_mask = bool(_GENERATION_BLOCK.search(str(template))) and bool(
            getattr(self.tok, "is_fast", False)
        )
        self._chat_checked = True

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        try:
            ids = self.tok.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
                **self.chat_kwargs,
            )
        except Exception as e:  # the template (Jinja) may raise anything on data it does not accept
            raise RowProblem(f"chat template failed: {type(e).__name__}: {e}") from None
        return list(ids)

    def _messages(self, messages: Any) -> tuple[list[int], list[int]]:
        self._check_chat()
        if not isinstance(messages, list) or not messages:
            raise RowProblem("'messages' must be a non-empty array of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise RowProblem(f"messages[{i}] must be an object, got a JSON {json_type(m)}")
            role = m.get("role")
            if not isinstance(role, str) or not role:
                raise RowProblem(f"messages[{i}] has no 'role' string")
            content = m.get("content")
            if not (isinstance(content, (str, list)) or (content is None and m.get("tool_calls"))):
                raise RowProblem(f"messages[{i}] has no 'content' string")
        if not any(m["role"] == "assistant" for m in messages):
            raise RowProblem("conversation has no assistant turn (nothing to train on)")
        if self._use_generation_mask:
            try:
                out = self.tok.apply_chat_template(
                    messages,
                    tokenize=True,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                    **self.chat_kwargs,
                )
            except Exception as e:  # see _render
                raise RowProblem(f"chat template failed: {type(e).__name__}: {e}") from None
            ids = list(out["input_ids"])
            mask = list(out["assistant_masks"])
        else:
            ids = self._render(messages, add_generation_prompt=False)
            mask = [0] * len(ids)
            for start, end in self._assistant_spans(ids, messages):
                mask[start:end] = [1] * (end - start)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        if all(label == IGNORE_INDEX for label in labels):
            raise RowProblem("the chat template rendered no token for the assistant turns")
        return ids, labels

    def _assistant_spans(self, full: list[int], messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """Token spans of ``full`` (the rendered conversation) that belong to assistant turns.

        See the module docstring: incremental prefix rendering + common-prefix diff, with a common-suffix
        re-alignment for templates that render the final assistant turn differently.
        """
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts = [_common_prefix(full, self._render(messages[:i], True)) if i else 0 for i in turns]
        spans = []
        for k, i in enumerate(turns):
            start = starts[k]
            bound = starts[k + 1] if k + 1 < len(turns) else len(full)
            upto = self._render(messages[: i + 1], False)
            end = _common_prefix(full, upto)
            if end < len(upto):
                end = max(end, _realign_end(full, upto, end, bound))
            end = min(end, bound)
            if end > start:
                spans.append((start, end))
        return spans


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _realign_end(full: list[int], upto: list[int], diverge: int, bound: int) -> int:
    """End of an assistant turn in ``full`` when ``upto`` (the conversation rendered up to and including that
    turn) is not a prefix of ``full``: the position ``q`` in ``(diverge, bound]`` whose preceding tokens share
    the longest suffix with ``upto``'s divergent tail (earliest on ties); ``diverge`` if none does."""
    tail = upto[diverge:]
    best_q, best_len = diverge, 0
    last = tail[-1]
    for q in range(diverge + 1, min(bound, len(full)) + 1):
        if full[q - 1] != last:
            continue
        n = 0
        limit = min(len(tail), q - diverge)
        while n < limit and full[q - 1 - n] == tail[-1 - n]:
            n += 1
        if n > best_len:
            best_q, best_len = q, n
    return best_q
