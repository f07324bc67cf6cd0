"""Everything the service runs. Never imports torch."""
