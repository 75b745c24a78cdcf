"""Re-exports of :mod:`genedml_sd.datasets._layouts`, where the layout writers now live (kept for old imports)."""
