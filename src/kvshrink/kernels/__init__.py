"""Compiled arithmetic every family kernel shares (numba): tiles, unpacking, float16 reads."""
