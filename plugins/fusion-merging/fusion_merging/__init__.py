"""fusion-merging: data-free merge methods for fusion (task arithmetic family, weight averaging, geometric merges)."""
