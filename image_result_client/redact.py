"""Credentials hidden from what is shown: a Redis URL in a log line, an error,
the status command's output. The pool (shared.config) and the producer's CLI
show URLs the same way."""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

# Query parameters whose value is hidden: redis-py reads `password` (and any
# other name it is given) from the query; a name that says it is a secret is one.
_SECRET_PARAMETER_WORDS = ("pass", "secret", "token", "auth", "credential")
# The scheme and what ends it: "://", or a mistyped ":/" or ":" (redis:/user:pw@host),
# after which what looks like an authority is read as one, so its password is hidden too.
_URL_HEAD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*:(?://|/(?!/))?)([^/?#]*)(.*)", re.DOTALL)
_IGNORED_BY_URLSPLIT = str.maketrans("", "", "\t\r\n")


def redact_url(url: str) -> str:
    """The URL with every credential replaced by ***, safe for logs and errors.

    Hidden: the password of `user:password@` (the user name stays), a lone
    `token@` (redis-py sends it to AUTH, and people put passwords there), any
    query parameter whose name says it is a secret (`?password=`, percent-encoded
    or not), and, when an unencoded / ? or # in a password made the "@" fall
    outside the authority, or a mistyped "redis:///user:pw@host" left the
    authority empty, everything up to that "@" (a unix:// path may hold an "@").
    Spellings without "//" (`redis:/user:pw@host`, `redis:user:pw@host`) are read
    as if it were there.
    """
    # Read the text as urlsplit, and so redis-py, does.
    text = url.lstrip("".join(map(chr, range(0x21)))).translate(_IGNORED_BY_URLSPLIT)
    match = _URL_HEAD.fullmatch(text)
    head, authority, rest = match.groups() if match else ("", "", text)
    if "@" not in authority and "@" in rest and (authority or not head.lower().startswith("unix:")):
        cut = rest.rindex("@")
        authority, rest = authority + rest[:cut + 1], rest[cut + 1:]
    # After the cut: a "#" in the password would otherwise hide the real query in a "fragment".
    return head + _redact_userinfo(authority) + _redact_query(rest)


def _redact_userinfo(authority: str) -> str:
    userinfo, at, host = authority.rpartition("@")
    if not at or not userinfo:
        return authority
    user, colon, password = userinfo.partition(":")
    if not colon:
        return f"***@{host}"
    return f"{user}:***@{host}" if password else authority


def _redact_query(rest: str) -> str:
    """`rest` (path?query#fragment) with secret query parameters' values hidden."""
    body, hash_, fragment = rest.partition("#")
    path, question, query = body.partition("?")
    if not question:
        return rest
    pieces = re.split(r"([&;])", query)
    for index, piece in enumerate(pieces):
        name, equals, value = piece.partition("=")
        if equals and value and any(word in unquote_plus(name).lower() for word in _SECRET_PARAMETER_WORDS):
            pieces[index] = f"{name}=***"
    return f"{path}?{''.join(pieces)}{hash_}{fragment}"
