"""Metrics, feature extractors and pictures for evaluate.py and in-training evaluation."""
