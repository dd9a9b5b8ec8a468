"""The control plane: CRD generation, reconcilers, autoscaler, cost, metrics, settings.

Imports the shared resource models from `tandem.api`; never imports `tandem.workloads` (what runs in
pods), which is enforced by tests/unit/test_layers.py.
"""
