"""A set of ids in 11-21 bytes each: a backfill of millions of rows keeps memory flat.

Only 62-bit hashes of the ids are kept, in one open-addressing array, with two flags
per slot (seen in this input, already in the output). Two different ids with the same
hash (about a 1 in 10**7 chance at a million rows) would be taken for one.
"""

from __future__ import annotations

import hashlib
from array import array


class IdSet:
    """Ids as hashes in one open-addressing ``array('q')``, each with two flag bits.

    One 8-byte slot per id at a load of at most 3/4 (11-21 bytes an id) instead of
    the ~100 of a Python set of strings, so a million ids cost a few MB. A slot holds
    a 62-bit hash and the flags set for it (:data:`SEEN`, :data:`WRITTEN`), so one
    table serves as both the set of ids seen in the input and the set written to the
    output. Two ids share a hash with odds of about n²/2⁶³ (10⁻⁷ for a million rows):
    such a row would be taken as a duplicate, or as done.
    """

    __slots__ = ("_count", "_mask", "_table")

    SEEN = 1
    WRITTEN = 2
    _FLAGS = 3

    def __init__(self, expected: int = 0) -> None:
        size = 16
        while size * 3 < expected * 4:
            size *= 2
        self._table = array("q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0

    @staticmethod
    def hash(item: str) -> int:
        digest = hashlib.blake2b(item.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        key = int.from_bytes(digest, "little", signed=True) & ~IdSet._FLAGS
        return key or 4  # 0 marks an empty slot

    def add(self, item: str, flag: int = SEEN) -> bool:
        """Set ``flag`` for ``item``; False when it was set already."""
        return self.add_hash(self.hash(item), flag)

    def has(self, item: str, flag: int = SEEN) -> bool:
        return self.has_hash(self.hash(item), flag)

    def __contains__(self, item: object) -> bool:
        """Whether ``item`` is here with any flag."""
        return isinstance(item, str) and self._find(self.hash(item)) >= 0

    def add_hash(self, key: int, flag: int = SEEN) -> bool:
        """:meth:`add` for an id already hashed with :meth:`hash` (hash once, ask twice)."""
        table, mask = self._table, self._mask
        i = key & mask
        while (slot := table[i]) != 0:
            if slot & ~IdSet._FLAGS == key:
                if slot & flag:
                    return False
                table[i] = slot | flag
                return True
            i = (i + 1) & mask
        table[i] = key | flag
        self._count += 1
        if self._count * 4 > len(table) * 3:
            self._grow()
        return True

    def has_hash(self, key: int, flag: int = SEEN) -> bool:
        i = self._find(key)
        return i >= 0 and bool(self._table[i] & flag)

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return len(self._table) * self._table.itemsize

    def _find(self, key: int) -> int:
        table, mask = self._table, self._mask
        i = key & mask
        while (slot := table[i]) != 0:
            if slot & ~IdSet._FLAGS == key:
                return i
            i = (i + 1) & mask
        return -1

    def _grow(self) -> None:
        old = self._table
        size = len(old) * 2
        table = array("q", bytes(8 * size))
        mask = size - 1
        for slot in old:
            if slot != 0:
                i = (slot & ~IdSet._FLAGS) & mask
                while table[i] != 0:
                    i = (i + 1) & mask
                table[i] = slot
        self._table, self._mask = table, mask
