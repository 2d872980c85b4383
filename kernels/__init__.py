"""Triton kernels for the fused OLSS sampler step, with their torch reference (import as olss_fast.kernels)."""
