"""Built-in components, registered as ordinary plugins through the public hooks."""
