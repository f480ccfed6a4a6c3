"""Pixels: shared-memory segments and URLs in, decoded and colour-managed frames, JPEG bytes out."""
