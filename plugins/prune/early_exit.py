"""Placeholder: being written (issue 19)."""
