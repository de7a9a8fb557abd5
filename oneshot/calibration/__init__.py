"""Calibration data sources, streaming statistics and the hooks that feed them."""
