"""eventaudit eventaudit package."""
