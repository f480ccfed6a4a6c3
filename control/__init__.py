"""Watching and steering the pool, apart from the task path: the operator
commands (`python supervisor.py status|check|dead|host|task|dashboard`) and,
inside the supervisor, its metrics thread and its chores in Redis (upkeep)."""
