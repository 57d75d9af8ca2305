"""cloud-forwarder: `python -m cloud_forwarder`."""

from iotpipe import main

from .service import CloudForwarder, Settings

main(Settings, CloudForwarder)
