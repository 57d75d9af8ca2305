"""cloud-forwarder service."""
