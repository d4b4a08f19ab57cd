"""The dymu inference service.

FastAPI over a model runtime, the preference cache and Prometheus metrics will live here.
"""
