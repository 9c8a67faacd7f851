"""The box's configuration file, ``<home>/edgeid.toml``: validated, with embedded defaults."""
