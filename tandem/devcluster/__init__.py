"""The local Kubernetes control plane for demo and tests, built from the official Go modules."""
