"""`vt extract`: not implemented yet."""
