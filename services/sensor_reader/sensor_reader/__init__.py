"""sensor-reader service."""
