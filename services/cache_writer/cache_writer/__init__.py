"""cache-writer service."""
