"""sensor-reader: `python -m sensor_reader`."""

from iotpipe import main

from .service import SensorReader, Settings

main(Settings, SensorReader)
