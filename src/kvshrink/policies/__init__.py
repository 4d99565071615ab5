"""Which tokens each head keeps: paged block storage, attention scores, budgets."""
