"""The training driver: Ray Train + PyTorch, checkpoints, resume, progress (runs in TrainingJob pods)."""
