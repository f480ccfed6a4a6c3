"""The producer client's old name in this repository; it is `image_result_client`
now (`pip install` installs only that). Kept while docs and scripts move over."""

from image_result_client import Producer, Submission, WaitTimeout

__all__ = ["Producer", "Submission", "WaitTimeout"]
