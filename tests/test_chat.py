"""`usaf chat`: replies equal stock transformers' greedy generation on the rendered conversation (every family,
through usaf's prepared model); the real command driven through a pseudo-terminal; plain completion without
a chat template."""

import io
import os
import re
import select
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import usaf
from usaf.testing import EOS_ID, FAMILIES, make_tiny_model, make_tiny_tokenizer, save_tiny_checkpoint
from usaf.train.chat import ChatSession, end_of_turn_ids, run_chat
from usaf.train.trained import load_trained

IM_END_ID = 5
TURNS = ["Say the fox then the dog", "And now the cat, please"]


def _stock_replies(model, tok, turns, n=8):
    """Greedy replies of stock ``generate`` on the conversation rendered by hand, turn after turn."""
    msgs, out = [], []
    for text in turns:
        msgs.append({"role": "user", "content": text})
        ids = torch.tensor([tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=tok.pad_token_id)
        reply = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(reply)
        msgs.append({"role": "assistant", "content": reply.strip()})
    return out


def test_end_of_turn_is_read_from_the_template():
    assert end_of_turn_ids(make_tiny_tokenizer()) == [EOS_ID, IM_END_ID]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_turns_match_stock_generation_on_every_family(family):
    model = make_tiny_model(family)
    tok = make_tiny_tokenizer(model.config.vocab_size)
    want = _stock_replies(model, tok, TURNS)
    usaf.prepare(model, usaf.UsafConfig(quant="none"))  # zero deltas: the same model, through usaf's experts
    out = io.StringIO()
    session = ChatSession(model, tok, temperature=0, max_new_tokens=8, out=out)
    got = [session.reply(t) for t in TURNS]
    assert got == want
    assert out.getvalue() == "".join(want)  # streamed: everything that was returned was shown
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    session.reset()
    assert session.reply(TURNS[0]) == want[0]


def test_without_a_chat_template_it_says_so_and_completes_plainly():
    model = make_tiny_model("qwen3_moe")
    tok = make_tiny_tokenizer(model.config.vocab_size)
    tok.chat_template = None
    ids = torch.tensor([tok("The quick brown")["input_ids"]])
    want = tok.decode(model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                     eos_token_id=[EOS_ID], pad_token_id=0)[0, ids.shape[1]:],
                      skip_special_tokens=True)
    out, err = io.StringIO(), io.StringIO()
    lines = iter(["The quick brown", "/exit"])
    run_chat(ChatSession(model, tok, temperature=0, max_new_tokens=6, out=out), lambda p: next(lines), err=err)
    assert err.getvalue().startswith("usaf: note: the tokenizer has no chat template: plain completion")
    assert f"model> {want}\n" in out.getvalue()


class Screen:
    """A child process on a pseudo-terminal: type into it, read what it shows."""

    def __init__(self, argv):
        self.master, slave = os.openpty()
        env = dict(os.environ, TERM="dumb", PYTHONPATH=os.pathsep.join(sys.path))
        self.p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.text = ""

    def wait_for(self, pattern, timeout=240):
        end = time.time() + timeout
        while not re.search(pattern, self.text):
            r, _, _ = select.select([self.master], [], [], max(0.0, end - time.time()))
            if not r:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen:\n{self.text}")
            try:
                self.text += os.read(self.master, 4096).decode(errors="replace")
            except OSError:
                raise AssertionError(f"process ended; screen:\n{self.text}") from None
        return self.text

    def type(self, line):
        os.write(self.master, (line + "\n").encode())


def test_chat_through_a_pseudo_terminal(tmp_path):
    ckpt = save_tiny_checkpoint("qwen3_moe", tmp_path / "ckpt")
    # loaded from the checkpoint, so the delta is tied to the checkpoint on disk (as `usaf chat --model` loads it)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.05))
    gen = torch.Generator().manual_seed(1)
    for d in handle.deltas().values():
        d.set(torch.randperm(d.numel, generator=gen)[: d.numel // 20], torch.randn(d.numel // 20, generator=gen) * 0.2)
    handle.save_delta(tmp_path / "delta.safetensors")
    ref, tok, _ = load_trained(str(ckpt), str(tmp_path / "delta.safetensors"), "cpu", "fp32")
    want = _stock_replies(ref, tok, TURNS, n=10)

    s = Screen([sys.executable, "-m", "usaf", "chat", "--model", str(ckpt), "--delta", str(tmp_path / "delta.safetensors"),
                "--dtype", "fp32", "--device", "cpu", "--temperature", "0", "--max-new-tokens", "10"])
    try:
        s.wait_for(r"you> $")
        for i, text in enumerate(TURNS):
            s.type(text)
            screen = s.wait_for(rf"(?s)(model> .*){{{i + 1}}}you> $")
            shown = screen.rsplit("model> ", 1)[1].rsplit("you> ", 1)[0]
            assert shown.replace("\r\n", "\n") == want[i] + "\n", (shown, want[i])
        s.type("/reset")
        s.wait_for(r"\(new conversation\)\r\nyou> $")
        s.type(TURNS[1])  # a new conversation: the second question alone
        s.wait_for(r"(?s)(model> .*){3}you> $")
        s.type("/exit")
        assert s.p.wait(timeout=60) == 0
    finally:
        if s.p.poll() is None:
            s.p.kill()
        os.close(s.master)
    assert "usaf chat: /reset starts a new conversation" in s.text
    assert "Traceback" not in s.text
