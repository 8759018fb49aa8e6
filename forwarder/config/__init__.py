"""Configuration: the settings schema, loading TOML and environment overrides, validation
and rendering (`schema`).
"""
