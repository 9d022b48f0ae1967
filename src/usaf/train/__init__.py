"""The training run (recipe), its resume checks, run outputs, checkpoints, data parallelism and evaluation."""
