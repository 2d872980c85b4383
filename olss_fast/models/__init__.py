"""Models shipped with olss_fast: the analytic Gaussian-mixture test model (``gmm``), the bundled digits model
(``digits``, trained by ``train_digits``) and its classifier metrics (``digit_metrics``)."""
