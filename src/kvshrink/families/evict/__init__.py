"""Paged per-head eviction: KV-Compress and SnapKV budgets over one block pool."""
