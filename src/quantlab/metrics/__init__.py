"""Pure text metrics computed on generations (no model, no I/O)."""
