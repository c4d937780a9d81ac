"""`vt models`: not implemented yet."""
