"""Offline training of dymu models.

Datasets, the three training stages, baselines and evaluation will live here.
"""
