"""Evaluation harness (DESIGN.md protocol): perplexity, agreement, needles, memory, speed."""
