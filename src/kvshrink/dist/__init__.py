"""Beyond one process: sequence-parallel prefill and a head-sharded cache on torch.distributed (sp.py)."""
