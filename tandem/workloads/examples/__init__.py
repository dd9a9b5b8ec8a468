"""Complete user training loops on the session API (`spec.trainer.entrypoint`), shipped in the image."""
