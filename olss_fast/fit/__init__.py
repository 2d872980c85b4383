"""The fitting layer: driving a pipeline to record a teacher (``recording``, ``work``, ``teacher``, ``checkpoint``,
``distributed``), re-fitting through the pipeline (``probe``), the one-call ``fit_olss_scheduler``
(``orchestration``, options in ``config``) and learned-step baselines (``baselines``) (docs/design.md, "Layers")."""
