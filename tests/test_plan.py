"""``usaf plan``: parameter counts from config.json, peak-memory predictions, placement, suggestions, CLI."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from usaf.engine.families import UnsupportedModelError
from usaf.memory import plan, sizes
from usaf.memory.counts import count_model
from usaf.memory.phase import AUTO_CHECKPOINT_GAIN
from usaf.memory.report import format_plan
from usaf.units import parse_memory

# Qwen/Qwen3-30B-A3B config.json (the fields that matter; published: 30.5 B total, 3.3 B active).
QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "torch_dtype": "bfloat16",
}
GB = 10**9


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3-30b-a3b")
    (d / "config.json").write_text(json.dumps(QWEN3_30B))
    return d


@pytest.fixture(scope="module")
def qwen8(qwen_dir):
    return plan.predict(qwen_dir, 512, 1, 0.005, "top:8", "4bit", "bf16", "8GB", "32GB", "cuda")


def test_parse_memory():
    assert parse_memory("12GB") == 12 * 10**9
    assert parse_memory("12GiB") == 12 * 2**30
    assert parse_memory("512MB") == 512 * 10**6
    assert parse_memory("1.5 tb") == 1_500_000_000_000
    assert parse_memory("4096") == 4096
    for bad in ("12XB", "", "GB", "-1GB", "0GB", "twelve", "12 G B"):
        with pytest.raises(ValueError) as e:
            parse_memory(bad, "--device-memory")
        assert "\n" not in str(e.value) and "--device-memory" in str(e.value)


def test_qwen3_30b_counts(qwen_dir):
    mc = count_model(qwen_dir / "config.json")  # a config.json path works like its directory
    kinds = mc.by_kind()
    assert abs(kinds["total"] - 30.5e9) / 30.5e9 < 0.01
    assert abs(kinds["active"] - 3.3e9) / 3.3e9 < 0.05
    assert kinds["experts"] == 48 * 128 * 3 * 2048 * 768
    assert kinds["routers"] == 48 * 128 * 2048
    assert kinds["embeddings"] == kinds["lm_head"] == 151936 * 2048  # untied
    assert kinds["shared_experts"] == 0
    assert mc.top_k == 8 and mc.num_layers == 48 and len(mc.moe_layers) == 48
    # 4-bit g64 = 4.5 bits per weight
    assert sizes.layer_expert_bytes(mc.layers[0], "4bit", 64, 2) == 128 * 3 * 2048 * 768 * 9 // 16


def test_qwen3_8gb_fits_and_streams_frozen_experts(qwen8):
    r = qwen8
    for key in (
        "fits",
        "train_peak_device_bytes",
        "train_peak_host_bytes",
        "infer_peak_device_bytes",
        "infer_peak_host_bytes",
    ):
        assert key in r
    assert r["fits"] and r["train_fits"] and r["infer_fits"]
    assert r["train_peak_device_bytes"] <= 8 * GB and r["infer_peak_device_bytes"] <= 8 * GB
    assert r["train_peak_host_bytes"] <= 32 * GB and r["infer_peak_host_bytes"] <= 32 * GB
    # inference needs all 48 layers' experts (16.3 GB at 4 bit): most of them are streamed from the host
    placed = r["infer"]["experts_placement"]
    assert placed["host"] + placed["disk"] > 0 and sum(placed.values()) == 48
    # training: the frozen layers below top:8 are only needed to build the prefix cache -> disk
    assert r["train"]["train_layers"] == [40, 47]
    disk = [p for p in r["train"]["breakdown"] if p["tier"] == "disk"]
    assert disk and r["train"]["disk_bytes"] > 10 * GB
    # 24.2 M active elements at 16 B (+4 B gradient during the step)
    assert r["train"]["active_elements"] == pytest.approx(0.005 * 8 * 128 * 3 * 2048 * 768, rel=1e-6)
    json.dumps(r)  # JSON-serializable


def test_qwen3_1gb_does_not_fit_and_suggests(qwen_dir):
    r = plan.predict(qwen_dir, 512, 1, 0.005, "top:8", "4bit", "bf16", "1GB", "32GB", "cuda")
    assert not r["fits"]
    assert r["train"]["problems"] and r["suggestions"]
    assert r["min_budget_bytes"] > 1 * GB
    text = format_plan(r)
    assert "DOES NOT FIT" in text and "try:" in text


def test_suggestion_is_a_setting_that_fits(qwen_dir):
    r = plan.predict(qwen_dir, 2048, 4, 0.005, "top:8", "8bit", "bf16", "3GB", "32GB", "cuda")
    assert not r["fits"] and r["suggestion"] is not None
    args = r["suggestion"]["settings"].split()
    kw = {args[i][2:].replace("-", "_"): args[i + 1] for i in range(0, len(args), 2)}
    again = plan.predict(
        qwen_dir,
        int(kw["seq_len"]),
        int(kw["batch_size"]),
        float(kw["density"]),
        kw["train_layers"],
        kw["quant"],
        "bf16",
        "3GB",
        "32GB",
        "cuda",
        chunk_mb=int(kw["chunk_mb"]),
    )
    assert again["fits"]


def test_cpu_device_is_host_ram(qwen_dir):
    r = plan.predict(qwen_dir, device="cpu", host_memory="24GB")
    assert r["fits"] and r["device_budget_bytes"] == r["host_budget_bytes"] == 24 * GB
    assert r["train_peak_device_bytes"] == r["train_peak_host_bytes"] <= 24 * GB
    assert r["infer_peak_device_bytes"] == r["infer_peak_host_bytes"] <= 24 * GB


def test_cpu_embeddings_are_a_view_only_in_the_checkpoints_dtype(qwen_dir, tmp_path):
    """On the CPU the streamed load keeps the input embeddings a view of the checkpoint's memory map when the
    compute dtype is the checkpoint's (only a batch's rows resident); computing in fp32 from a bf16 checkpoint
    copies all of them (measured at Qwen3-30B-A3B width, 3 layers: inference peak 5,316 MB, planned 3.97 GB
    before, 5.21 GB now). A checkpoint saved in fp32 is a view again."""
    embed = QWEN3_30B["vocab_size"] * QWEN3_30B["hidden_size"]

    def infer(d, dtype):
        r = plan.predict(d, device="cpu", host_memory="64GB", dtype=dtype)
        return next(q["bytes"] for q in r["infer"]["breakdown"] if q["item"] == "non-expert weights")

    assert infer(qwen_dir, "fp32") - 2 * infer(qwen_dir, "bf16") > 0.9 * embed * 4
    d32 = tmp_path / "fp32"
    d32.mkdir()
    (d32 / "config.json").write_text(json.dumps(dict(QWEN3_30B, torch_dtype="float32")))
    assert infer(d32, "fp32") == 2 * infer(qwen_dir, "bf16")


def test_layout_options_move_peaks_the_right_way(qwen_dir):
    kw = {"device_memory": "80GB", "host_memory": "64GB"}
    base = plan.predict(qwen_dir, checkpointing="on", **kw)
    no_ckpt = plan.predict(qwen_dir, checkpointing=False, **kw)
    resident = plan.predict(qwen_dir, prefix_cache=False, checkpointing="on", **kw)
    longer = plan.predict(qwen_dir, seq_len=2048, checkpointing="on", **kw)
    assert no_ckpt["train_peak_device_bytes"] > base["train_peak_device_bytes"]
    # usaf train's auto rule: on exactly when the plan with checkpointing has a lower step peak (by > AUTO_CHECKPOINT_GAIN)
    for extra in ({}, {"seq_len": 2048, "batch_size": 4}, {"train_layers": "top:1", "seq_len": 16}):
        auto = plan.predict(qwen_dir, **extra, **kw)["train"]["checkpointing"]
        on, off = (plan.predict(qwen_dir, checkpointing=c, **extra, **kw)["train_peak_device_bytes"]
                   for c in ("on", "off"))
        assert auto == ("on" if on < (1 - AUTO_CHECKPOINT_GAIN) * off else "off")
    assert plan.predict(qwen_dir, seq_len=2048, batch_size=4, **kw)["train"]["checkpointing"] == "on"
    assert plan.predict(qwen_dir, train_layers="top:1", seq_len=16, **kw)["train"]["checkpointing"] == "off"
    assert resident["train_peak_device_bytes"] > base["train_peak_device_bytes"] + 10 * GB
    assert longer["train_peak_device_bytes"] > base["train_peak_device_bytes"]


def test_user_errors_are_one_line(qwen_dir):
    dense = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "intermediate_size": 128,
    }
    with pytest.raises(UnsupportedModelError, match="not a supported Mixture-of-Experts") as e:
        plan.predict(dense, device_memory="8GB")
    assert "\n" not in str(e.value)
    for kwargs in (
        {"device_memory": "8 bananas"},
        {},
        {"device_memory": "8GB", "train_layers": "top:x"},
        {"device_memory": "8GB", "density": 0},
        {"device_memory": "8GB", "quant": "3bit"},
    ):
        with pytest.raises(ValueError) as e:
            plan.predict(qwen_dir, **kwargs)
        assert "\n" not in str(e.value)


def test_cli_json_and_errors(qwen_dir, tmp_path, capsys):
    from usaf.cli import main

    assert (
        main(["plan", "--model", str(qwen_dir), "--device-memory", "8GB", "--host-memory", "32GB", "--json"])
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert {
        "fits",
        "train_peak_device_bytes",
        "train_peak_host_bytes",
        "infer_peak_device_bytes",
        "infer_peak_host_bytes",
    } <= set(r)
    assert (
        main(["plan", "--model", str(qwen_dir / "config.json"), "--device", "cpu", "--host-memory", "24GiB"])
        == 0
    )
    out = capsys.readouterr().out
    assert "host RAM" in out and "verdict" in out
    assert main(["plan", "--model", str(qwen_dir), "--device-memory", "12XB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usaf: error:") and err.count("\n") == 1
    dense = tmp_path / "config.json"
    dense.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 100,
                "intermediate_size": 128,
            }
        )
    )
    assert main(["plan", "--model", str(dense), "--device-memory", "8GB"]) == 2
    err = capsys.readouterr().err
    assert "not a supported Mixture-of-Experts" in err and err.count("\n") == 1


@pytest.mark.parametrize("family", __import__("usaf.testing", fromlist=["FAMILIES"]).FAMILIES)
def test_tiny_families_plan(family):
    from usaf.testing import tiny_config

    for device in ("cuda", "cpu"):
        r = plan.predict(tiny_config(family), device_memory="2GB", host_memory="4GB", device=device)
        assert r["fits"], r["train"]["problems"] + r["infer"]["problems"]
        assert r["model"]["params"]["experts"] > 0 and r["train"]["active_elements"] > 0
        format_plan(r)


# ---------------------------------------------------------------------------------------------- accuracy
class _LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of live tensor storages created under this mode (``ignore``: storages that exist)."""

    def __init__(self, ignore: set[int]):
        super().__init__()
        self.ignore, self.live, self.cur, self.peak = ignore, {}, 0, 0

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in self.live or key in self.ignore:
            return
        self.live[key] = n = st.nbytes()
        self.cur += n
        self.peak = max(self.peak, self.cur)

        def gone(k=key, n=n):
            if self.live.pop(k, None) is not None:
                self.cur -= n

        weakref.finalize(st, gone)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_prediction_matches_live_tensor_peak():
    """Resident layout (``--no-prefix-cache``): predicted vs measured peak of live tensor bytes (CPU), for
    one training step with SDPA and no checkpointing, with eager attention and checkpointing, and
    inference."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import usaf
    from usaf.engine.checkpointing import enable_checkpointing
    from usaf.engine.loss import lm_loss

    conf = Qwen3MoeConfig(
        vocab_size=2048,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        tie_word_embeddings=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(conf).to(torch.bfloat16)
    handle = usaf.prepare(model, usaf.UsafConfig(density=0.01, quant="4bit", train_layers="all"))
    ids = torch.randint(3, 2048, (2, 64))
    for d in handle.deltas().values():  # an active set of the planned size (what select would pick)
        d.set(torch.randperm(d.numel)[: round(0.01 * d.numel)])
    opt = usaf.UsafOptimizer(handle)

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def step() -> None:  # usaf train's loss (chunked LM head)
        total, count = lm_loss(model, batch, "cpu")
        (total / count).backward()
        opt.step()
        opt.zero_grad()

    def infer() -> None:  # a plain forward (the plan's inference: logits, no loss)
        with torch.no_grad():
            model(input_ids=ids)

    def measure(fn) -> int:
        ts = list(model.parameters()) + list(model.buffers()) + opt.masters
        ts += [t for m in handle.layers for st in m.experts.frozen.values() for t in st.tensors().values()]
        ts += [t for p in opt.values + opt.masters for t in opt.state_of(p).values() if isinstance(t, torch.Tensor)]
        held = _storages(ts)
        with _LiveTensors(set(held)) as mode:
            fn()
        return sum(held.values()) + mode.peak

    def predicted(attn: str, checkpointing: str) -> tuple[int, int]:
        r = plan.predict(
            conf,
            seq_len=64,
            batch_size=2,
            density=0.01,
            train_layers="all",
            device="cpu",
            host_memory="64GB",
            checkpointing=checkpointing,
            prefix_cache=False,
            attn=attn,
            suggest=False,
        )

        def tensors(phase: dict) -> int:  # no runtime, no checkpoint staging, no selection buffers
            parts = [
                p for p in phase["breakdown"] if not p["item"].startswith("runtime") and p["tier"] != "disk"
            ]
            kind = lambda *ks: sum(p["bytes"] for p in parts if p["kind"] in ks)  # noqa: E731
            return kind("resident", "step") + max(kind("loss"), kind("layer"))

        return tensors(r["train"]), tensors(r["infer"])

    model.train()
    step()  # allocates the optimizer state
    train_sdpa = measure(step)
    model.eval()
    infer_sdpa = measure(infer)
    model.set_attn_implementation("eager")
    model.train()
    enable_checkpointing(handle)
    train_eager_ckpt = measure(step)

    pred_train, pred_infer = predicted("sdpa", "off")
    assert pred_train == pytest.approx(train_sdpa, rel=0.2)
    assert pred_infer == pytest.approx(infer_sdpa, rel=0.2)
    assert predicted("eager", "on")[0] == pytest.approx(train_eager_ckpt, rel=0.2)


def test_attention_deltas_planned(qwen_dir):
    """--attention-density adds its deltas' state to the step and its score buffers to selection."""
    kw = {"device_memory": "80GB", "host_memory": "64GB", "checkpointing": "on"}
    base, attn = plan.predict(qwen_dir, **kw), plan.predict(qwen_dir, attention_density=0.05, **kw)
    # Qwen3-30B-A3B attention: q 4096x2048, k/v 512x2048, o 2048x4096 per layer; top 8 layers train
    per_layer = 2 * 4096 * 2048 + 2 * 512 * 2048
    active = 8 * round(0.05 * per_layer)
    assert attn["train"]["active_elements"] - base["train"]["active_elements"] == active
    grew = attn["train_peak_device_bytes"] - base["train_peak_device_bytes"]
    assert 16 * active <= grew <= 21 * active  # indices, values, moments (+ gradients within the layer)
    scores = attn["select_peak_host_bytes"] + attn["select_peak_device_bytes"] - \
        base["select_peak_host_bytes"] - base["select_peak_device_bytes"]
    assert scores >= 8 * per_layer * 2  # bf16 score buffers of every trainable layer's projections


# Qwen/Qwen1.5-MoE-A2.7B config.json (the fields that matter): a shared expert of 4 x 1408 beside 60 routed ones.
QWEN15_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
    "num_hidden_layers": 24, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "intermediate_size": 5632, "num_attention_heads": 16,
    "num_key_value_heads": 16, "vocab_size": 151936, "tie_word_embeddings": False, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "norm_topk_prob": False, "max_position_embeddings": 8192, "rms_norm_eps": 1e-06,
    "torch_dtype": "bfloat16",
}


def test_shared_deltas_planned():
    """--shared-density adds its deltas' state to the step and its score buffers to selection; the counts hold
    each layer's shared-expert linear weights (gate, up, down; not the shared expert's 1-wide gate)."""
    per_layer = 3 * 2048 * 5632
    counts = count_model(QWEN15_MOE)
    assert all(lc.shared_linear_params == per_layer for lc in counts.layers)
    kw = {"device_memory": "80GB", "host_memory": "64GB", "checkpointing": "on"}
    base, sh = plan.predict(QWEN15_MOE, shared_density=0, **kw), plan.predict(QWEN15_MOE, shared_density=0.05, **kw)
    active = 8 * round(0.05 * per_layer)  # top 8 layers train
    assert sh["train"]["active_elements"] - base["train"]["active_elements"] == active
    grew = sh["train_peak_device_bytes"] - base["train_peak_device_bytes"]
    assert 16 * active <= grew <= 21 * active  # indices, values, moments (+ gradients within the layer)
    scores = sh["select_peak_host_bytes"] + sh["select_peak_device_bytes"] - \
        base["select_peak_host_bytes"] - base["select_peak_device_bytes"]
    assert scores >= 8 * per_layer * 2  # bf16 score buffers of every trainable layer's shared linears
    with pytest.raises(ValueError, match="--shared-density"):
        plan.predict(QWEN15_MOE, shared_density=2.0, **kw)


def test_stages_around_the_step(qwen_dir):
    """The load, prefix-build and export phases: the host tier keeps the span's stacks from the load on (the disk
    tier none); the prefix build adds every non-expert weight; the export holds the delta and the originals three
    times (read, serialized, read back). The delta's
    predicted bytes are those of a real delta file (indices and fp32 values, routers in fp32)."""
    from usaf.memory.stages import delta_bytes

    r = plan.predict(qwen_dir, device="cpu", host_memory="256GB", train_layers="top:8")
    st = r["stages"]
    assert st["expert_tier"] == "host"
    span = sum(sizes.layer_expert_bytes(lc, "4bit", 64, 2) for lc in count_model(qwen_dir).layers[40:])
    items = {p["item"].split(" (")[0]: p["bytes"] for p in st["load_cached"]["breakdown"]}
    assert items["frozen experts of layers 40-47"] == span
    assert st["load_first"]["peak_bytes"] > st["load_cached"]["peak_bytes"] > span
    assert st["prefix"]["peak_bytes"] > st["load_cached"]["peak_bytes"] + 1.2e9  # + embeddings, head, attention
    assert r["prefix_peak_host_bytes"] == st["prefix"]["peak_bytes"]
    small = plan.predict(qwen_dir, device="cpu", host_memory="8GB", train_layers="top:8")["stages"]
    assert small["expert_tier"] == "disk" and small["load_cached"]["peak_bytes"] == sizes.CPU_RUNTIME_HOST
    delta, originals = (st["export_delta"]["breakdown"][i]["bytes"] for i in (1, 2))
    assert originals == r["train"]["active_elements"] * 2  # bf16 values of the checkpoint
    assert st["export_delta"]["peak_bytes"] == sizes.CPU_RUNTIME_HOST + 3 * delta + 3 * originals
    # against a real delta file: a tiny model, its top 2 layers selected at density 0.05
    import usaf
    from usaf.io import read_safetensors
    from usaf.memory.sizes import Settings
    from usaf.testing import make_tiny_model

    model = make_tiny_model("qwen3_moe", num_hidden_layers=3)
    h = usaf.prepare(model, usaf.UsafConfig(quant="none", density=0.05, train_layers="top:2"))
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    from usaf.engine.select import select

    select(h, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
    path = qwen_dir.parent / "delta.safetensors"
    h.save_delta(path)
    tensors, _ = read_safetensors(path)
    got = sum(t.numel() * t.element_size() for t in tensors.values())
    want = delta_bytes(count_model(model.config), Settings(density=0.05, train_layers="top:2"))
    assert abs(got - want) <= 0.01 * got, (got, want)

