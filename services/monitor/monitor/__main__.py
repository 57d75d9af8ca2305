"""monitor: `python -m monitor`."""

from iotpipe import main

from .service import Monitor, Settings

main(Settings, Monitor)
