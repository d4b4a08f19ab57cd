"""Routers of the dymu app."""
