"""What the supervisor, the workers and the ledger writer all use.

Unrelated to the `../shared` folder beside the repository.
"""
