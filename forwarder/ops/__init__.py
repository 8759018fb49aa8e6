"""Running in production: systemd notify and watchdog, logging (`logs`) and metrics (`metrics`),
log throttling, secrets (`credentials`) and the state directory.
"""
