"""Model runtimes: each loads one kind of model and computes one batch (imports torch lazily)."""
