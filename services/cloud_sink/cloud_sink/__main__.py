"""cloud-sink: a stand-in cloud ingest endpoint."""

from iotpipe import configure_logging

from .app import Settings, run

settings = Settings()
configure_logging(settings)
run(settings)
