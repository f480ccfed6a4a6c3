"""The child process roles: `worker` (task loop) and `ledger` (sole owner of results.json)."""
