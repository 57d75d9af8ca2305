"""cloud-sink: a stand-in for the cloud endpoint (local stack, compose, tests)."""
