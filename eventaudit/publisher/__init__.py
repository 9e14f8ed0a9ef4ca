"""eventaudit publisher package."""
