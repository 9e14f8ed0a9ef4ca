"""eventaudit subscriber package."""
