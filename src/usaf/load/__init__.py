"""Where weights come from: Hugging Face checkpoints (streamed, quantized while read, cached), tiers, mmap."""
