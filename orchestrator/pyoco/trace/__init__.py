"""pyoco's trace backends: the abstract :class:`TraceBackend` and the console one."""
