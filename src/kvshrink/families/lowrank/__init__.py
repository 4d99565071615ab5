"""Zero-delay low rank (ZDC/FDC): calibrated bases, reduced-dimension keys and values."""
