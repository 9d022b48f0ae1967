"""Frozen-prefix cache: cached hidden states equal a fresh forward; training from them changes nothing."""

import json

import pytest
import torch

import usaf
from usaf.cli import main
from usaf.engine import forward
from usaf.engine.forward import prefix_hidden, suffix_logits, suffix_matches
from usaf.memory.prefix import release_prefix
from usaf.testing import FAMILIES, make_tiny_model, save_tiny_checkpoint

IDS = torch.randint(6, 320, (2, 16), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(IDS)
MASK[1, 12:] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_hidden_and_suffix_forward_are_exact(family):
    model = make_tiny_model(family)
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", train_layers="top:1"))
    start = handle.trainable_layers[0].index
    with torch.no_grad():
        full = model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
        hidden = prefix_hidden(model, start, IDS, MASK)
        assert torch.equal(hidden, full.hidden_states[start])  # bit for bit
        logits = suffix_logits(model, start, hidden, MASK)
    assert torch.equal(logits[MASK.bool()], full.logits[MASK.bool()])
    assert suffix_matches(model, start, IDS, MASK)
    # the prefix layers and (unless the head shares them) the input embeddings released: the same suffix
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embed.weight
    weights = embed.weight.numel() * embed.weight.element_size()
    assert release_prefix(handle, start) >= (0 if tied else weights)
    assert (embed.weight.device.type == "meta") == (not tied)
    with torch.no_grad():
        assert torch.equal(suffix_logits(model, start, hidden, MASK), logits)


def test_suffix_forward_forgets_the_rope_deltas_of_another_batch(monkeypatch):
    """A vision-language model that keeps the rope deltas of its last forward and adds them when given
    ``inputs_embeds`` alone (qwen3_omni_moe_thinker): the suffix forward forgets them and matches the full
    forward; kept, the deltas of the batch that ran in between are caught by ``suffix_matches``."""
    model = make_tiny_model("qwen3_omni_moe_thinker")
    assert suffix_matches(model, 1, IDS, MASK)
    monkeypatch.setattr(forward, "_forget_rope_deltas", lambda model: None)
    assert not suffix_matches(model, 1, IDS, MASK)


def test_training_with_prefix_cache_equals_without(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("USAF_PREFIX_CACHE", str(tmp_path / "prefix"))
    ckpt = save_tiny_checkpoint("deepseek_v3", tmp_path / "c")
    rows = [{"text": f"{w} fox {w} dog {i} " * 4} for i, w in enumerate("abcdefghijklmnopqrstuvwxyz")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--model", str(ckpt), "--data", str(data), "--steps", "12", "--seq-len", "32",
              "--batch-size", "4", "--lr", "0.01", "--density", "0.05", "--train-layers", "top:1",
              "--reselect-every", "3"]  # 48 visits: about one epoch, so the cache is built (prefix_pays_off)
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "a"), "--no-prefix-cache", "--quiet"]) == 0
    assert "%|" not in capsys.readouterr().err  # --quiet: no bar
    monkeypatch.setenv("USAF_PROGRESS", "1")  # stderr is no terminal here
    assert main(common + ["--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err  # the phase bars (rate and ETA) of a run that is not quiet
    assert "frozen-prefix cache (layers 0-" in err and "selection (scoring layers)" in err
    assert "eval (held-out batches)" in err and "checking the suffix forward" in err
    assert len(list((tmp_path / "prefix").glob("*.bin"))) == 1
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert la == lb
    ma = json.loads((tmp_path / "a" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert ma["eval_ppl_before"] == mb["eval_ppl_before"] and ma["eval_ppl_after"] == mb["eval_ppl_after"]
    # a second run reuses the cache file
    assert main(common + ["--out", str(tmp_path / "c2"), "--quiet"]) == 0
    assert "%|" not in capsys.readouterr().err
    assert len(list((tmp_path / "prefix").glob("*.bin"))) == 1


def test_the_support_probe_is_short(monkeypatch):
    """``enable_prefix_cache`` probes the family on 32 + 16 tokens, not on two full training sequences (five
    full forwards of 512 tokens cost minutes at real width)."""
    from usaf.data.examples import Example
    from usaf.memory import prefix

    seen = []
    monkeypatch.setattr(prefix, "suffix_matches", lambda model, start, ids, mask, bar: seen.append(mask.sum(1)) or False)
    handle = usaf.prepare(make_tiny_model("qwen3_moe"), usaf.UsafConfig(quant="none", train_layers="top:1"))
    rows = [Example(list(range(6, 70)), list(range(6, 70)))] * 3
    assert prefix.enable_prefix_cache(handle, rows, [], 2, 0) is False
    assert seen[0].tolist() == [prefix.PROBE_TOKENS, prefix.PROBE_TOKENS // 2]


def test_no_prefix_cache_for_a_short_run_on_a_large_dataset(tmp_path, monkeypatch):
    """A run that visits few of its sequences does not build the cache (it would compute every sequence's
    hidden states once); it trains as --no-prefix-cache does."""
    import usaf.train.recipe as recipe
    from usaf.memory.prefix import prefix_pays_off

    assert prefix_pays_off(24, 3, 24) and not prefix_pays_off(180, 20, 8) and prefix_pays_off(180, 20, 180)
    monkeypatch.setenv("USAF_PREFIX_CACHE", str(tmp_path / "prefix"))
    built = []
    enable = recipe.enable_prefix_cache
    monkeypatch.setattr(recipe, "enable_prefix_cache", lambda *a, **k: built.append(1) or enable(*a, **k))
    ckpt = save_tiny_checkpoint("deepseek_v3", tmp_path / "c")
    rows = [{"text": f"{w} fox {w} dog {i} " * 4} for i, w in enumerate("abcdefghijklmnopqrstuvwxyz" * 4)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--model", str(ckpt), "--data", str(data), "--seq-len", "32", "--batch-size", "4",
              "--lr", "0.01", "--density", "0.05", "--train-layers", "top:1", "--quiet"]
    assert main(common + ["--steps", "2", "--out", str(tmp_path / "a")]) == 0
    assert not built and not list((tmp_path / "prefix").glob("*.bin"))
    assert main(common + ["--steps", "2", "--out", str(tmp_path / "b"), "--no-prefix-cache"]) == 0
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert la == lb
    assert main(common + ["--steps", "60", "--out", str(tmp_path / "whole"), "--reselect-every", "0"]) == 0
    # about one epoch: built
    assert built and len(list((tmp_path / "prefix").glob("*.bin"))) == 1


def test_tied_input_embeddings_stay_with_the_head():
    model = make_tiny_model("qwen3_moe", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    handle = usaf.prepare(model, usaf.UsafConfig(quant="none", train_layers="top:1"))
    start = handle.trainable_layers[0].index
    with torch.no_grad():
        hidden = prefix_hidden(model, start, IDS, MASK)
        logits = suffix_logits(model, start, hidden, MASK)
        release_prefix(handle, start)
        assert model.get_input_embeddings().weight.device.type == "cpu"
        assert torch.equal(suffix_logits(model, start, hidden, MASK), logits)
