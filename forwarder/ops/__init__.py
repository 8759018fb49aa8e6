"""Running in production: systemd notify and watchdog, logging and metrics (`telemetry`),
log throttling, secrets (`credentials`) and the state directory.
"""
