"""Triton kernels with their torch references, dispatched in one place (:mod:`olss_fast.kernels.fused_step`).

The modules live in the repository's top-level ``kernels/`` folder (the design card's place for them); this package
links to them, so they import as ``olss_fast.kernels.*`` from a checkout and from a wheel alike, and the top-level
folder, which has no ``__init__.py``, can never shadow an installed ``kernels`` package (docs/design.md, "Layers").
"""
