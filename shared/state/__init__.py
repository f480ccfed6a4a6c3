"""The pool's state in Redis: the one owner of its keys, their reads and writes, and the Lua scripts that move them."""
