"""kopf handlers, one module per resource."""
