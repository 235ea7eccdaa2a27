"""Conversions from and to other libraries' delta files."""
