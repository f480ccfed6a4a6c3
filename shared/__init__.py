"""What more than one of the pool's processes uses, grouped by what it holds:
state/ (the pool's state in Redis), imaging/ (pixels in, JPEG bytes out),
storage/ (OUTPUT_DIR's files), ipc/ (what the pool's processes tell each
other); on this floor, the contract with the pipeline (config, messages) and
the small basics every process shares.

Unrelated to the `../shared` folder beside the repository.
"""
