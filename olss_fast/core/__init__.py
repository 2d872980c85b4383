"""The core layer: the OLSS mathematics and file formats, with no diffusers import (docs/design.md, "Layers").

The step formula (``step``), least squares on Gram matrices (``lstsq``), streaming statistics (``stats``), the path
search (``search``), the student-in-the-loop re-fit (``refine``), the OSS baseline (``oss``), the schedule format
(``schedule``), input checks (``checks``), file rules and the digest (``files``), the weights fingerprint
(``fingerprint``), the provenance comparison (``provenance``) and sample metrics (``metrics``).
"""
