"""The online store's Redis key layout, shared by `publish-features` and the service.

Standard library only, so that the service's workers import it without the trainer's
dependencies. Both of a user's keys carry the user id as a Redis Cluster hash tag,
`{prefix}:user:{<id>}` and `{prefix}:hist:{<id>}` (the braces are literal), so they share one
hash slot: a user's writes stay atomic (one transaction or script), on a standalone Redis and
on a cluster alike. The item change log's keys (`item_change_keys`) share the tag `{items}`.
"""

from __future__ import annotations

DEFAULT_PREFIX = "tr"
# Newest history items kept per user (publish-features, HISTORY_CAP): at least the longest
# history a trainer default reads (the sequential tower's 200), or the tower sees fewer.
DEFAULT_HISTORY_CAP = 200


def hash_tag(user_id: str) -> str:
    """The user id as a hash tag's content: Redis hashes what lies between the first `{` and
    the first `}` after it, so a `}` in the id (and `%`, to keep the mapping one-to-one) is
    percent-encoded; a tag never ends early, and an id starting with `}` never leaves it empty
    (an empty tag hashes the whole key, which would split the user's keys over two slots)."""
    return user_id.replace("%", "%25").replace("}", "%7D")


def check_prefix(prefix: str) -> str:
    """A key prefix must hold no brace: the first `{` of a key must open the user's tag."""
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError("a key prefix must be non-empty, without '{' or '}'")
    return prefix


def user_key(prefix: str, user_id: str) -> str:
    """Raw user features, a JSON object string."""
    return f"{prefix}:user:{{{hash_tag(user_id)}}}"


def history_key(prefix: str, user_id: str) -> str:
    """Recent item ids, a Redis list, newest first, capped."""
    return f"{prefix}:hist:{{{hash_tag(user_id)}}}"


# Every key of the item change log carries this hash tag, so they share one Redis Cluster slot
# and one change (counter, record, order) is written by one script, atomically. No user's keys
# can collide with it: a user's tag is their id, and these keys are not under `user:`/`hist:`.
ITEM_CHANGES_TAG = "{items}"


def item_change_keys(prefix: str) -> tuple[str, str, str, str]:
    """The item change log (`app.store.item_changes_redis`), in the order its scripts take
    them: the sequence counter (INCR), a hash item id -> the latest change as JSON, a sorted set
    item id -> that change's sequence number (what a reader asks "what changed after n?"), and
    the log's epoch (a random token written with its first change: a reader that finds another
    one knows the log was lost or replaced and replays it from the start)."""
    base = f"{prefix}:catalogue:{ITEM_CHANGES_TAG}"
    return f"{base}:seq", f"{base}:changes", f"{base}:order", f"{base}:epoch"
