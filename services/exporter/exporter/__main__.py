"""exporter: `python -m exporter`."""

from iotpipe import main

from .service import Exporter, Settings

main(Settings, Exporter)
