"""Peers measured in the same run: transformers' own QuantizedCache."""
