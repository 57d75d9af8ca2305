"""cache-writer: `python -m cache_writer`."""

from iotpipe import main

from .service import CacheWriter, Settings

main(Settings, CacheWriter)
