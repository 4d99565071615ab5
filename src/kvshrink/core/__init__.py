"""The shared mechanism: token store, base layer and cache, block pool, calibration files."""
