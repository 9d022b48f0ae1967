"""Training data: files -> examples (kinds, chat templates, packing) -> batches (split, padding, sharding)."""
