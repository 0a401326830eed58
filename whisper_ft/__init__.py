"""The Whisper model and its I/O: loading and converting formats, audio, text and tokens, the encoder, decoding."""
