"""Tests for :mod:`usaf.data` (offline: the tokenizer is trained on the fly)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from usaf.data.batches import Batches, collate, epoch_order, split_eval
from usaf.data.examples import IGNORE_INDEX, DataError, Example
from usaf.data.load import load_examples
from usaf.engine.loss import token_weighted_loss

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today?",
    "I am fine, thank you very much!",
    "user assistant system think",
    "Mixture of experts models route every token to a few experts.",
    "What is the capital of France? Paris is the capital of France.",
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Same rendering, with the assistant output marked for `return_assistant_tokens_mask`.
CHATML_GENERATION = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen3-like: only the *final* assistant turn gets an (empty) think block, so a conversation rendered up to
# an earlier assistant turn is not a prefix of the full rendering.
CHATML_THINK_LAST = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello world, how are you?"},
    {"role": "assistant", "content": "I am fine, thank you!"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def labeled_spans(tok, ex: Example) -> list[str]:
    """Decoded runs of consecutive positions that carry a label."""
    spans, run = [], []
    for token, label in zip(ex.input_ids, ex.labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(label)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return [tok.decode(s) for s in spans]


def error_of(path: Path, tok, seq_len: int = 64) -> DataError:
    with pytest.raises(DataError) as info:
        load_examples(path, tok, seq_len)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)
    return info.value


# --------------------------------------------------------------------------------------------------------
# Kinds and masks
# --------------------------------------------------------------------------------------------------------


def test_text_rows_are_packed(tok, tmp_path):
    texts = ["Hello world, how are you today?", "I am fine.", "The quick brown fox jumps over the lazy dog."]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    stream = [i for t in texts for i in [tok.bos_token_id, *enc(tok, t), tok.eos_token_id]]
    seq_len = 8
    examples, stats = load_examples(path, tok, seq_len)
    assert stats.kind == "text" and stats.packed and stats.rows == 3
    n_full, tail = divmod(len(stream), seq_len)
    kept_tail = tail >= math.ceil(0.25 * seq_len)
    assert len(examples) == stats.sequences == n_full + kept_tail
    assert all(len(ex) == seq_len for ex in examples[:n_full])
    flat = [i for ex in examples for i in ex.input_ids]
    assert flat == stream[: len(flat)]
    assert stats.dropped_tokens == (0 if kept_tail else tail)
    assert all(ex.labels == ex.input_ids for ex in examples)
    assert stats.tokens == len(flat)
    assert stats.loss_tokens == sum(len(ex) - 1 for ex in examples)
    assert stats.truncated == stats.dropped == 0


def test_packing_tail_rule(tok, tmp_path):
    # one document of exactly n tokens: bos + 'x' * (n - 2) + eos ('x' is one token)
    assert len(enc(tok, "xxxx")) == 4
    for n, seq_len, expected in [(17, 16, (1, 1)), (20, 16, (2, 0)), (5, 16, (1, 0))]:
        path = write_jsonl(tmp_path / f"p{n}.jsonl", [{"text": "x" * (n - 2)}])
        examples, stats = load_examples(path, tok, seq_len)
        # (sequences, dropped tokens): a 1-token tail is < 25% of 16 -> dropped; 4 tokens = 25% -> kept;
        # a lone short window is kept.
        assert (len(examples), stats.dropped_tokens) == expected, n


def test_txt_file_is_one_packed_document(tok, tmp_path):
    text = "Hello world, how are you today?\nI am fine, thank you very much!\n\nThe quick brown fox.\n"
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    examples, stats = load_examples(path, tok, 16)
    assert stats.kind == "text" and stats.rows == 1 and stats.packed
    flat = [i for ex in examples for i in ex.input_ids]
    assert flat[0] == tok.bos_token_id and flat[-1] == tok.eos_token_id
    assert tok.decode(flat[1:-1]) == text
    assert all(len(ex) == 16 for ex in examples[:-1])


def test_prompt_completion_masks_only_completion(tok, tmp_path):
    rows = [
        {"prompt": "What is the capital of France?", "completion": " Paris is the capital."},
        {"prompt": "Hello world,", "completion": " how are you today?"},
    ]
    examples, stats = load_examples(write_jsonl(tmp_path / "pc.jsonl", rows), tok, 64)
    assert stats.kind == "prompt_completion" and not stats.packed and stats.sequences == 2
    for ex, row in zip(examples, rows):
        assert tok.decode(ex.input_ids) == "<s>" + row["prompt"] + row["completion"] + "</s>"
        assert labeled_spans(tok, ex) == [row["completion"] + "</s>"]
        assert ex.labels[0] == IGNORE_INDEX
    assert stats.loss_tokens == sum(len(enc(tok, r["completion"])) + 1 for r in rows)


def test_messages_mask_assistant_turns_by_prefix_diff(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (ex,), stats = load_examples(path, tok, 256)
    assert stats.kind == "messages"
    assert ex.input_ids == tok.apply_chat_template(CONVERSATION, return_dict=False)
    # content + the end-of-turn markup the template writes after it; not the "assistant" header
    assert labeled_spans(tok, ex) == [
        "I am fine, thank you!<|im_end|>\n",
        "Paris is the capital.<|im_end|>\n",
    ]


def test_messages_mask_with_generation_template(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    tok.chat_template = CHATML_GENERATION
    try:
        (ex,), _ = load_examples(path, tok, 256)
    finally:
        tok.chat_template = CHATML
    assert labeled_spans(tok, ex) == ["I am fine, thank you!<|im_end|>", "Paris is the capital.<|im_end|>"]


def test_messages_mask_when_final_turn_renders_differently(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    tok.chat_template = CHATML_THINK_LAST
    try:
        (ex,), _ = load_examples(path, tok, 256)
    finally:
        tok.chat_template = CHATML
    assert labeled_spans(tok, ex) == [
        "I am fine, thank you!<|im_end|>\n",
        "<think>\n\n</think>\n\nParis is the capital.<|im_end|>\n",
    ]


def test_tokens_kind(tok, tmp_path):
    ids = enc(tok, "Hello world")
    rows = [{"input_ids": ids}, {"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]}]
    examples, stats = load_examples(write_jsonl(tmp_path / "ids.jsonl", rows), tok, 64)
    assert stats.kind == "tokens"
    assert examples[0].input_ids == ids and examples[0].labels == ids
    assert examples[1].labels == [IGNORE_INDEX] + ids[1:]


def test_directory_is_concatenated_in_sorted_order(tok, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"prompt": "b", "completion": "B"}])
    write_jsonl(d / "a.jsonl", [{"prompt": "a", "completion": "A"}])
    (d / ".hidden").write_text("ignored")
    examples, stats = load_examples(d, tok, 64)
    assert [tok.decode(ex.input_ids) for ex in examples] == ["<s>aA</s>", "<s>bB</s>"]
    assert stats.files == [str(d / "a.jsonl"), str(d / "b.jsonl")]
    (d / "c.csv").write_text("x")
    assert "c.csv" in str(error_of(d, tok))


# --------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------


def test_mixed_kinds_name_the_line(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl", [{"text": "a"}, "", {"text": "b"}, {"prompt": "p", "completion": "c"}]
    )
    err = error_of(path, tok)
    assert err.line == 4 and ", line 4:" in str(err) and "prompt_completion" in str(err)


def test_malformed_json_names_the_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "", "", '{"text": "b",}'])
    err = error_of(path, tok)
    assert err.line == 4 and "malformed JSON" in str(err)


@pytest.mark.parametrize(
    "row, words",
    [
        ({"foo": 1}, "unknown row kind"),
        ([1, 2], "JSON object"),
        ({"text": "a", "messages": []}, "ambiguous"),
        ({"prompt": "p"}, "'completion'"),
        ({"text": 3}, "string"),
        ({"input_ids": [1, 2], "labels": [1]}, "entries"),
        ({"input_ids": [1, 100000]}, "not a valid token id"),
        ({"input_ids": [1, True]}, "not an integer"),
    ],
)
def test_bad_rows(tok, tmp_path, row, words):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    err = error_of(path, tok)
    assert err.line == 1 and words in str(err)


def test_messages_without_assistant_turn(tok, tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "Hello"}]}]
    err = error_of(write_jsonl(tmp_path / "chat.jsonl", rows), tok)
    assert err.line == 2 and "assistant" in str(err)


def test_messages_without_chat_template(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    tok.chat_template = None
    try:
        err = error_of(path, tok)
    finally:
        tok.chat_template = CHATML
    assert "chat template" in str(err)


def test_empty_and_unsupported(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no data" in str(error_of(empty, tok))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n")
    assert "no data" in str(error_of(blank, tok))
    unsupported = tmp_path / "data.json"
    unsupported.write_text("[]")
    assert "unsupported" in str(error_of(unsupported, tok))
    assert "no such file" in str(error_of(tmp_path / "missing.jsonl", tok))


def test_over_long_rows_are_truncated_or_dropped(tok, tmp_path):
    long_prompt = "Hello world, how are you today? " * 8
    rows = [
        {"prompt": "Hi", "completion": " fine"},  # fits
        {"prompt": "Hello world,", "completion": " how are you today? " * 8},  # completion cut
        {"prompt": long_prompt, "completion": " fine"},  # completion entirely cut -> dropped
    ]
    seq_len = 16
    examples, stats = load_examples(write_jsonl(tmp_path / "long.jsonl", rows), tok, seq_len)
    assert stats.rows == 3 and stats.sequences == 2 == len(examples)
    assert stats.truncated == 2 and stats.dropped == 1
    assert all(len(ex) <= seq_len for ex in examples)
    assert len(examples[1]) == seq_len
    assert tok.decode(examples[1].input_ids).startswith("<s>Hello world, how are")
    only_dropped = write_jsonl(tmp_path / "dropped.jsonl", [rows[2]])
    assert "no usable" in str(error_of(only_dropped, tok, seq_len))


# --------------------------------------------------------------------------------------------------------
# Split, collate, batches
# --------------------------------------------------------------------------------------------------------


def _examples(n: int) -> list[Example]:
    return [Example(list(range(1, 2 + i % 5)), list(range(1, 2 + i % 5))) for i in range(n)]


def test_split_eval_is_deterministic_and_disjoint():
    examples = _examples(50)
    train, evals = split_eval(examples, fraction=0.1, seed=3)
    assert len(evals) == 5 and len(train) == 45
    assert {id(e) for e in train}.isdisjoint(id(e) for e in evals)
    again = split_eval(examples, fraction=0.1, seed=3)
    assert [id(e) for e in again[1]] == [id(e) for e in evals]
    assert [id(e) for e in split_eval(examples, fraction=0.1, seed=4)[1]] != [id(e) for e in evals]
    assert len(split_eval(examples, fraction=0.5, max_eval=7)[1]) == 7
    assert len(split_eval(_examples(3), fraction=0.01, min_eval=1)[1]) == 1
    assert split_eval(examples, fraction=0.0)[1] == []
    with pytest.raises(DataError):
        split_eval(_examples(1))


def test_collate_pads_right():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def _ids(batch: list[Example]) -> list[int]:
    return [id(ex) for ex in batch]


def test_batches_cover_each_epoch_deterministically():
    examples = _examples(10)
    a, b = Batches(examples, 3, seed=1), Batches(examples, 3, seed=1)
    assert len(a) == 4 and len(Batches(examples, 3, drop_last=True)) == 3
    epoch0 = [_ids(x) for x in a]
    assert epoch0 == [_ids(x) for x in b]
    assert sorted(i for batch in epoch0 for i in batch) == sorted(id(e) for e in examples)
    assert a.epoch == 1 and a.position == 0
    epoch1 = [_ids(x) for x in a]
    assert epoch1 != epoch0
    assert [_ids(x) for x in Batches(examples, 3, seed=2)] != epoch0
    plain = Batches(examples, 4, shuffle=False, pad_id=0)
    assert next(iter(plain))["input_ids"].shape == (4, 4)


def test_batches_resume_exactly():
    examples = _examples(11)
    reference = Batches(examples, 4, seed=7)
    expected = [_ids(reference.next_batch()) for _ in range(10)]  # crosses 3 epochs (3 batches each)
    for k in range(10):
        run = Batches(examples, 4, seed=7)
        got = [_ids(run.next_batch()) for _ in range(k)]
        state = json.loads(json.dumps(run.state_dict()))
        resumed = Batches(examples, 4, seed=123)
        resumed.load_state_dict(state)
        got += [_ids(resumed.next_batch()) for _ in range(10 - k)]
        assert got == expected, k
    # the per-epoch iteration resumes mid-epoch too
    run = Batches(examples, 4, seed=7)
    it = iter(run)
    first = _ids(next(it))
    resumed = Batches(examples, 4, seed=7)
    resumed.load_state_dict(run.state_dict())
    assert [first] + [_ids(b) for b in resumed] == expected[:3]
    with pytest.raises(ValueError):
        Batches(examples[:5], 4).load_state_dict(run.state_dict())


def test_a_state_saved_before_order_version_2_resumes_with_the_old_order():
    """States saved before the numpy order carry no ``order``: they resume in the order their run started with
    (Python's ``random.shuffle``, bit for bit), while new runs draw version 2 and save it."""
    import random

    examples = _examples(11)
    old = list(range(11))
    random.Random("usaf-batches:7:0").shuffle(old)  # epoch 0 of seed 7 as the earlier code drew it
    run = Batches(examples, 4, seed=7)
    state = run.state_dict()
    assert state.pop("order") == 2
    resumed = Batches(examples, 4, seed=0)
    resumed.load_state_dict(state)  # an old state: no "order"
    assert _ids(resumed.next_batch()) == [id(examples[i]) for i in old[:4]]
    assert resumed.state_dict()["order"] == 1
    assert epoch_order(11, 7, 0).tolist() != old and sorted(epoch_order(11, 7, 0).tolist()) == list(range(11))
    with pytest.raises(ValueError, match="order version 3"):
        epoch_order(11, 7, 0, version=3)


@pytest.mark.parametrize("n", [16, 13, 9])
def test_ranks_take_turns_on_the_one_process_stream(n):
    """Rank r's q-th batch is micro-batch q * world + r of one process's stream, across epoch ends too."""
    examples = _examples(n)
    world, steps = 4, 9  # 9 global batches of 8: past the end of the first epochs
    one = Batches(examples, 2, seed=5)
    stream = [_ids(one.next_batch()) for _ in range(steps * world)]
    ranks = [Batches(examples, 8, seed=5, rank=r, world_size=world) for r in range(world)]
    got = [_ids(ranks[r].next_batch()) for _ in range(steps) for r in range(world)]
    assert got == stream
    assert sorted(i for b in stream[: one.micro_batches] for i in b) == sorted(id(e) for e in examples)
    # positions are micro-batches of the stream: a rank's state resumes the one-process stream there
    state = json.loads(json.dumps(ranks[0].state_dict()))
    assert state["batch_size"] == 2 and one.state_dict() == state
    resumed = Batches(examples, 4, seed=0, rank=1, world_size=2)  # 2 ranks x 2 continue the stream
    resumed.load_state_dict(state)
    one.next_batch()
    assert _ids(resumed.next_batch()) == _ids(one.next_batch())
    with pytest.raises(ValueError):
        Batches(examples, 6, world_size=4)


def test_rank_iteration_covers_the_epoch_once():
    """Iterating a rank yields the global batches that start in the epoch; the ranks' micro-batches of one
    epoch are the one-process epoch (the batch that spans the end takes its rest from the next epoch)."""
    examples = _examples(10)
    one = [_ids(b) for b in Batches(examples, 2, seed=3)]  # 5 micro-batches
    ranks = [[_ids(b) for b in Batches(examples, 4, seed=3, rank=r, world_size=2)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    assert [ranks[r][q] for q in range(2) for r in range(2)] + [ranks[0][2]] == one


# --------------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------------


def test_token_weighted_loss_matches_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    total, count = token_weighted_loss(logits, labels)
    assert total.dtype == torch.float32
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    expected = ForCausalLMLoss(logits, labels, vocab_size=11)
    torch.testing.assert_close(total / count, expected)
    manual = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(total / count, manual)
    # token-weighted across batches == loss over the concatenated batch
    s0, n0 = token_weighted_loss(logits[:1], labels[:1])
    s1, n1 = token_weighted_loss(logits[1:], labels[1:])
    torch.testing.assert_close((s0 + s1) / (n0 + n1), expected)


def test_token_weighted_loss_matches_model_loss(tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    rows = [
        {"prompt": "Hello world,", "completion": " how are you?"},
        {"prompt": "Hi", "completion": " fine"},
    ]
    examples, _ = load_examples(write_jsonl(tmp_path / "pc.jsonl", rows), tok, 64)
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
    total, count = token_weighted_loss(out.logits, batch["labels"])
    torch.testing.assert_close(total / count, out.loss)
