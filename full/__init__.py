"""Paper-scale backend for consistency models. Every formula is imported from cm.py."""
