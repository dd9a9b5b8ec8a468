"""InferenceService reconciler: kopf handlers -> reconcile logic -> builders -> API models."""
