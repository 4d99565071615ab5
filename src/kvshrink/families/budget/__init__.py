"""One bit budget for the whole cache: integer codes whose width, rotation and value groups are
chosen per layer and per keys/values by a calibrated loss proxy (`auto-6x`, `auto:budget=N`)."""
