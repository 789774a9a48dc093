"""study tests."""
