"""The model server: model, dynamic batcher, protocol handlers, HTTP transport (InferenceService pods)."""
