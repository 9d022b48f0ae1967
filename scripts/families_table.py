"""Print the table of docs/families.md: every enumerated family and its status, from the status check.

    PYTHONPATH=src python scripts/families_table.py > /tmp/table.md

Each family runs ``tests/test_families.py::_status`` (the tiny model, ``usaf.prepare``; a refusal is usaf's own
one-line message); "supported" rows are the families whose numerics ``tests/test_families.py`` checks. The
round-trip annotations come from ``tests/test_export.py::ROUNDTRIP``; "CLI by hand" lists the families whose
tiny checkpoint was run through ``usaf train`` / ``export --format hf`` / ``generate`` by hand (docs/families.md
says which commands).
"""

import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
warnings.filterwarnings("ignore")

from test_export import ROUNDTRIP  # noqa: E402
from test_families import CORE, DECODERS, _status  # noqa: E402

from usaf.engine.families import FAMILIES  # noqa: E402
from usaf.engine.model import decoder_layers  # noqa: E402
from usaf.testing import moe_families  # noqa: E402

BY_HAND = {"granitemoehybrid", "kimi_linear", "lara_mini", "minimax", "qwen3_5_moe_text", "qwen3_next",
           "qwen4_exp_text", "deepseek_ocr2", "glm4v_moe", "glm5_next", "hy_v4_vl", "mistral4", "mistral_large4",
           "qwen3_omni_moe_thinker", "step3p7", "unlimited_ocr"}


TEXT_OF = {"gemma4": "gemma4_text", "llama4": "llama4_text"}  # the core suite's wrapper names


def _relative(path: str, layer_name: str) -> str:
    return path[len(layer_name) + 1:] if path.startswith(layer_name + ".") else path


def row(family: str) -> str:
    wrappers = ", ".join(sorted(w for w, t in moe_families().items() if t == family and w != family))
    status, info = _status(family)
    if status == "refused":
        return f"| {family} | {wrappers} | refused: {info} |  |"
    _, _, handle = info
    exported = {TEXT_OF.get(f, f) for f, _ in ROUNDTRIP}
    tested = [t for t, on in (("test_engine", family in CORE), ("test_export", family in exported),
                              ("CLI by hand", family in BY_HAND and family not in exported)) if on]
    layer = handle.layers[0]
    names = {id(m): n for n, m in handle.model.named_modules()}
    layer_name = names[id(decoder_layers(handle.model)[layer.index])]
    flags = [f for f, on in (("transposed", handle.transposed), ("interleaved", not handle.concatenated),
                             ("biases", layer.experts.gate_up_bias is not None),
                             ("post-expert norm", layer.experts.post_expert_norm is not None)) if on]
    row_type = handle.family.model_type
    if row_type in FAMILIES:
        flags = [f"{', '.join(flags) or 'layout'} (row)"]
    where = ", ".join([f"`{_relative(layer.prefix, layer_name)}`",
                       f"router `{_relative(layer.router_prefix, layer_name)}`", *flags])
    label = "supported" + (f" ({', '.join(tested)})" if tested else "")
    return f"| {family} | {wrappers} | {label} | {where} |"


def main() -> None:
    torch.set_num_threads(1)
    rows = [row(f) for f in DECODERS]
    print("| model_type | also (wrappers) | status | experts, router |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    supported = sum(" | supported" in r for r in rows)
    print(f"\nsupported: {supported} of {len(rows)}", file=sys.stderr)


if __name__ == "__main__":
    main()
