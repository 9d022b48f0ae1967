import os
import tempfile

# Quantized expert caches written by the tests go to a throw-away directory.
os.environ.setdefault("USAF_QUANT_CACHE", tempfile.mkdtemp(prefix="usaf-quant-cache-"))
# So do the token stores (usaf.data.store).
os.environ.setdefault("USAF_TOKENS_CACHE", tempfile.mkdtemp(prefix="usaf-tokens-cache-"))
# And the tokenizers built from GGUF files (usaf.load.gguf.tokenizer).
os.environ.setdefault("USAF_TOKENIZER_CACHE", tempfile.mkdtemp(prefix="usaf-tokenizer-cache-"))
