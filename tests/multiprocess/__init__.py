"""multiprocess tests."""
