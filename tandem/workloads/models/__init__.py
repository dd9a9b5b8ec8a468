"""Tandem's built-in models: a GPT-style decoder-only language model and its byte-level tokenizer.

Import the submodules (`tandem.workloads.models.gpt`, `tandem.workloads.models.tokenizer`); this package
itself imports nothing heavy, so `import tandem.workloads.models` never pulls in torch.
"""
