"""`vt probe`: not implemented yet."""
