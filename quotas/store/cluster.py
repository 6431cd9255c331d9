"""Redis Cluster: the slot a key hashes to, and a multi-key operation split into one script per slot.

A cluster runs a script only if all its KEYS hash to one slot (else CROSSSLOT). A user's records share the hash tag
`{u<id>}` and a team's `{t<id>}`, so one slot each; but a lease for a key that spends from a team's pool covers the
user's windows and the team's (pool and member's cap) at once: two slots. So, in cluster mode only, `RedisStore`
groups a lease's, renewal's or settlement's keys by slot and runs the same script once per group; on a single Redis
(and behind Sentinel) every operation stays one script, one round trip. docs/quotas.md, "Redis Cluster", explains
why the guarantees hold; this module has no Redis client in it (tests/quotas/store/test_redis_cluster.py checks
`key_slot` against the cluster's own CLUSTER KEYSLOT).
"""

import functools

from .base import LeaseResult

SLOTS = 16384


def _crc16_table():
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[(crc >> 8) ^ byte]
    return crc


def hash_tag(key: bytes) -> bytes:
    """What of a key is hashed: the part between the first '{' and the next '}', unless that is empty or absent."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


@functools.lru_cache(maxsize=4096)
def key_slot(key: str) -> int:
    """The cluster slot of `key` (cached: a request's few keys come back at every lease)."""
    return crc16(hash_tag(key.encode())) % SLOTS


def slot_groups(keys) -> list[list[int]]:
    """The indices of `keys` grouped by slot, each group in key order and the groups in the order of their first key.
    A lease's windows come user first (policy.request_windows), so the user's group runs first."""
    groups = {}
    for index, key in enumerate(keys):
        groups.setdefault(key_slot(key), []).append(index)
    return list(groups.values())


async def lease_by_slot(run, windows, held, want) -> LeaseResult:
    """`RedisStore.lease` over several slots: the LEASE script once per slot's group of windows, as `run(group, held,
    want)` (the windows' indices, the holder's units in each of them, the tokens asked) -> LeaseResult.

    The first group is asked `want`, each next group what the previous granted: a later group can only grant less.
    The grant is the smallest. An earlier group that granted more is shrunk to it by the same script asked 0 with the
    corrected absolute `held` (the script records held + granted × rate: the holder's record becomes exactly what it
    is granted). A group with missing windows grants nothing anywhere: the groups after it are asked 0 (to name
    their own missing windows as well), the groups before it shrunk back to `held`.

    Each window is checked atomically in its own slot against at most what is finally recorded, so no window ever
    exceeds its limit; an earlier group may hold more than the final grant between its run and its shrink (a
    concurrent lease may then be granted less there: conservative, never over). If the store fails half-way, an
    earlier group keeps its grant until the holder's next lease or settlement rewrites it, or its TTL drops it.
    """
    groups = slot_groups([window.key for window in windows])
    granted, missing, results = want, [], []
    for group in groups:
        result = await run(group, [held[i] for i in group], 0 if missing else granted)
        results.append(result)
        if result.missing:
            missing += result.missing
        else:
            granted = min(granted, result.granted)
    if missing:
        granted = 0
    remaining = [0] * len(windows)
    for group, result in zip(groups, results):
        if result.granted > granted:
            result = await run(group, [held[i] + granted * windows[i].rate for i in group], 0)
        for index, units in zip(group, result.remaining):
            remaining[index] = units
    if missing:
        order = {window.key: i for i, window in enumerate(windows)}
        return LeaseResult(0, tuple(sorted(missing, key=order.get)), ())
    return LeaseResult(granted, (), tuple(remaining))
