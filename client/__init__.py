"""Submit images to image-result-worker from Python (`client.Producer`) or the shell (`python -m client`)."""

from client.producer import Producer, Submission, WaitTimeout

__all__ = ["Producer", "Submission", "WaitTimeout"]
