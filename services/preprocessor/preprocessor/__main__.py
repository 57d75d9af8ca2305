from iotpipe import configure_logging, load_settings_or_exit

from .service import Settings, run

settings = load_settings_or_exit(Settings)
configure_logging(settings)
run(settings)
