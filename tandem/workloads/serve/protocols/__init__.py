"""Protocol handlers: wire format (pydantic, at this boundary only) <-> domain calls on the data plane."""
