"""What the processes of one pool tell each other (worker to ledger, both to the supervisor) and systemd."""
