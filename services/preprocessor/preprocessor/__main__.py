"""preprocessor: `python -m preprocessor`."""

from iotpipe import main

from .service import Preprocessor, Settings

main(Settings, Preprocessor)
