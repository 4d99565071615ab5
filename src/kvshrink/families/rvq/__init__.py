"""Residual vector quantization with learned per-layer codebooks."""
