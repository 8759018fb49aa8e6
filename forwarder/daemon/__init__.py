"""The daemon: building the components, start, reload and the stop order (`lifecycle`)."""
