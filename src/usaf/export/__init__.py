"""What leaves a run: merged checkpoints in the source layout, revertible delta files, GGUF; the reference check."""
