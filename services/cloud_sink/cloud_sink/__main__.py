from iotpipe import setup_logging

from .app import Settings, run

settings = Settings()
setup_logging("cloud-sink", "0", settings.log_level, settings.log_format, settings.log_file)
run(settings)
