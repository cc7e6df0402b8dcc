"""The shapes world: scenes with known factors, the toy CLIP recipe, its evaluation and per-head probes."""
