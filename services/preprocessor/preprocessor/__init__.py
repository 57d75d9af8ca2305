"""preprocessor service."""
