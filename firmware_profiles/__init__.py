"""Device classes as data (one TOML file per class) and their validation."""
