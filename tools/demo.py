"""`make demo`: the main job on an embedded default (grows as the converter lands)."""
