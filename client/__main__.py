"""`python -m client`: the old name of `python -m image_result_client`."""

import sys

from image_result_client.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
