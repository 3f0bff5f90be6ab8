"""The smoke tier uses the session fixtures of tests/conftest.py (tiny_prepared, tiny_model_file)."""
