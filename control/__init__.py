"""Operator commands run as `python supervisor.py <command>`: status, check, dead."""
