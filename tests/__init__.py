"""Test package: lets tests import shared helpers as `from tests.media import ...`."""
