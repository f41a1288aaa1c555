"""Configuration: settings, the reader, config lines, limit kinds, prices."""
