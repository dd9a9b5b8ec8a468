"""What runs inside pods: the training driver and the model server."""
