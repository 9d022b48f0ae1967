"""GGUF files as a model source: the safe reader, the model built from its metadata and tensors."""
