"""Tandem: one platform for distributed training and autoscaled inference on Kubernetes."""

__version__ = "0.1.0"
