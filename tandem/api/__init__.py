"""API models of the tandem.dev/v1alpha1 custom resources (pydantic at the Kubernetes boundary)."""
