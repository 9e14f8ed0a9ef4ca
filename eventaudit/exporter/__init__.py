"""eventaudit exporter package."""
