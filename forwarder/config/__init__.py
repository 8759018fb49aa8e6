"""Configuration: the settings schema (`schema`, each setting declared once with `setting`),
loading TOML and environment overrides (`load`), the checks across settings (`validate`),
addresses in the settings (`address`), rendering the effective configuration (`render`), and
the shipped TOML and reference table written from the schema (`generate`).
"""
