"""Models shipped with olss_fast: the analytic Gaussian-mixture test model and the bundled digits model."""
