"""The serving layer: a searched schedule as a diffusers scheduler (``scheduler``) and as one compiled program
(``runner``: ``compile_olss_pipeline``), with its options (``config``), the backend interface (``backend``), the
PyTorch backend (``torch_backend``), the program (``program``), CUDA graphs and the compile cache
(docs/design.md, "Layers")."""
