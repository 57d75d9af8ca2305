"""exporter service: the plaintext projection for third parties."""
