"""What the pool writes to OUTPUT_DIR: the JPEGs, results.json and requests.json, and the directory's checks."""
