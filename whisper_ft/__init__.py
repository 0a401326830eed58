"""Whisper-specific pieces that are not the training loop: models, audio, text, decoding, metrics."""
