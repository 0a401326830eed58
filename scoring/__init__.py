"""Scoring: error rates per language, decoding and scoring systems per dialect, result tables."""
