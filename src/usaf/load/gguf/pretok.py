"""llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) <-> the ``pre_tokenizer`` of a ``tokenizer.json``.

A GGUF records its byte-level BPE tokenizer's pre-tokenizer by name only. transformers' GGUF reader picks a
pre-tokenizer by architecture (every ``qwen2``/``qwen3moe`` file gets Qwen2's pattern), so a file whose name
says otherwise (SmolLM2's ``smollm`` tokenizer in a ``qwen3moe`` file, say) tokenizes differently from
llama.cpp and from the checkpoint it came from. The names below are the ones usaf writes and sets on the
tokenizer it builds from a GGUF (:func:`pre_tokenizer_json`); export detects them from a ``tokenizer.json``
(:func:`tokenizer_pre`).
"""

from __future__ import annotations

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_NO_REGEX = dict(_BYTE_LEVEL, use_regex=False)
# name -> the regex of its ``Split`` (then a byte-level step without its own regex)
SPLIT_PATTERNS = {
    "qwen2": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
             "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "llama-bpe": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                 "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
}


def pre_tokenizer_json(name: str) -> dict | None:
    """The ``tokenizer.json`` ``pre_tokenizer`` of llama.cpp's pre-tokenizer ``name``; None for a name not known
    here."""
    if name == "gpt-2":
        return dict(_BYTE_LEVEL)
    if name == "smollm":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                      dict(_BYTE_LEVEL)]}
    if name in SPLIT_PATTERNS:
        return {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERNS[name]}, "behavior": "Isolated", "invert": False},
            dict(_BYTE_LEVEL_NO_REGEX)]}
    return None


def tokenizer_pre(tok: dict) -> str | None:
    """llama.cpp's pre-tokenizer name for a tokenizer.json, or None when it is not one we recognise."""
    pre = tok.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in items]
    if kinds == ["ByteLevel"] and items[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    if kinds[-1:] == ["ByteLevel"] and not items[-1].get("use_regex", True) and kinds[:-1] == ["Split"]:
        regex = (items[0].get("pattern") or {}).get("Regex")
        return next((n for n, p in SPLIT_PATTERNS.items() if p == regex), None)
    return None
