"""mergekit compatibility: read mergekit YAML recipes into fusion merges."""
