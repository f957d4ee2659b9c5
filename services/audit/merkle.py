"""RFC 6962 (Certificate Transparency) Merkle tree hashing, proofs and their verification.

Hashing (RFC 6962 section 2.1): a leaf is ``SHA-256(0x00 || data)``, an inner node
``SHA-256(0x01 || left || right)``, the empty tree ``SHA-256("")``; the tree over ``n`` leaves
splits at ``k``, the largest power of two smaller than ``n``. Proofs are generated as in
sections 2.1.1 (audit paths) and 2.1.2 (consistency), and verified with the algorithms of
RFC 9162 sections 2.1.3.2 and 2.1.4.2.

:class:`MerkleTree` keeps every *complete* subtree hash (32 bytes each, in one ``bytearray``
per level: about 64 bytes per leaf), so appending costs one hash amortized and the root at any
past size, an inclusion proof or a consistency proof costs O(log n) hashes: every range the
RFC's recursion visits is a run of at most log2(n) aligned complete subtrees.
:class:`CompactRange` keeps only the O(log n) peaks, for streaming a log once (verification).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

HASH_SIZE = 32
LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that cannot be produced for the sizes asked, or that does not verify."""


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one log entry."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an inner node."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (``n`` > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """The RFC 6962 tree head of a list of leaf hashes (O(n) hashes, O(log n) memory)."""
    peaks = CompactRange()
    for value in leaf_hashes:
        peaks.append(value)
    return peaks.root()


class CompactRange:
    """The peaks (maximal complete subtrees, largest first) of a growing tree."""

    def __init__(self) -> None:
        self.size = 0
        self._peaks: list[tuple[int, bytes]] = []

    def append(self, value: bytes) -> None:
        """Add the next leaf hash."""
        self.size += 1
        height, current = 0, value
        while self._peaks and self._peaks[-1][0] == height:
            _, left = self._peaks.pop()
            current = node_hash(left, current)
            height += 1
        self._peaks.append((height, current))

    def root(self) -> bytes:
        """The tree head of the leaves appended so far."""
        if not self._peaks:
            return EMPTY_ROOT
        current = self._peaks[-1][1]
        for _, left in reversed(self._peaks[:-1]):
            current = node_hash(left, current)
        return current


class MerkleTree:
    """An append-only RFC 6962 tree that answers roots and proofs for any size it has seen.

    Not thread-safe: guard it with a lock when one thread appends while others read.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        self.extend(leaf_hashes)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return self._size

    def append(self, value: bytes) -> int:
        """Add the next leaf hash; return its leaf index."""
        if len(value) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, not {len(value)}")
        index = self._size
        self._levels[0] += value
        self._size += 1
        level, position = 0, index
        while position & 1:
            row = self._levels[level]
            parent = node_hash(
                bytes(row[(position - 1) * HASH_SIZE : position * HASH_SIZE]),
                bytes(row[position * HASH_SIZE : (position + 1) * HASH_SIZE]),
            )
            if len(self._levels) == level + 1:
                self._levels.append(bytearray())
            self._levels[level + 1] += parent
            level, position = level + 1, position >> 1
        return index

    def extend(self, values: Iterable[bytes]) -> None:
        for value in values:
            self.append(value)

    def leaf(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        if not 0 <= index < self._size:
            raise IndexError(f"leaf index {index} is outside the tree (size {self._size})")
        return self._complete(0, index)

    def root(self, size: int | None = None) -> bytes:
        """The tree head over the first ``size`` leaves (default: all)."""
        size = self._size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._range(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` leaves, bottom-up.

        Raises:
            ProofError: when ``index`` is not a leaf of that tree or the size is unknown.
        """
        size = self._size if size is None else size
        self._check_size(size)
        if not 0 <= index < size:
            raise ProofError(f"leaf index {index} is not in a tree of size {size}")
        path: list[bytes] = []
        offset, m, n = 0, index, size
        while n > 1:
            k = _split(n)
            if m < k:
                path.append(self._range(offset + k, offset + n))
                n = k
            else:
                path.append(self._range(offset, offset + k))
                offset, m, n = offset + k, m - k, n - k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """The proof that the tree of ``old_size`` leaves is a prefix of ``new_size``'s.

        Empty when ``old_size`` is 0 or equals ``new_size`` (nothing to prove).

        Raises:
            ProofError: when ``old_size`` > ``new_size`` or ``new_size`` is unknown.
        """
        new_size = self._size if new_size is None else new_size
        self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ProofError(f"no consistency proof from size {old_size} to {new_size}")
        if old_size in (0, new_size):
            return []
        proof: list[bytes] = []
        offset, m, n, whole = 0, old_size, new_size, True
        while m != n:
            k = _split(n)
            if m <= k:
                proof.append(self._range(offset + k, offset + n))
                n = k
            else:
                proof.append(self._range(offset, offset + k))
                offset, m, n, whole = offset + k, m - k, n - k, False
        if not whole:
            proof.append(self._range(offset, offset + n))
        proof.reverse()
        return proof

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self._size:
            raise ProofError(f"tree size {size} is unknown (the tree has {self._size} leaves)")

    def _complete(self, level: int, position: int) -> bytes:
        row = self._levels[level]
        return bytes(row[position * HASH_SIZE : (position + 1) * HASH_SIZE])

    def _range(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end): ``start`` is aligned as in the RFC's recursion, so the
        range is complete subtrees of decreasing size, folded from the right."""
        chunks: list[bytes] = []
        position, remaining = start, end - start
        while remaining:
            height = remaining.bit_length() - 1
            width = 1 << height
            if position % width:
                raise AssertionError(f"range [{start}, {end}) is not aligned")
            chunks.append(self._complete(height, position >> height))
            position += width
            remaining -= width
        current = chunks[-1]
        for left in reversed(chunks[:-1]):
            current = node_hash(left, current)
        return current


def root_from_inclusion_proof(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """The root an audit path leads to (RFC 9162 section 2.1.3.2).

    Raises:
        ProofError: when the path's length does not fit ``index`` and ``size``.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    fn, sn = index, size - 1
    current = leaf
    for sibling in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            current = node_hash(sibling, current)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            current = node_hash(current, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the tree is deep")
    return current


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows the leaf hash ``leaf`` at ``index`` in the tree ``root``."""
    try:
        return root_from_inclusion_proof(leaf, index, size, proof) == root
    except ProofError:
        return False


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> bool:
    """Whether ``proof`` shows tree ``old_root`` (``old_size``) a prefix of ``new_root``
    (RFC 9162 section 2.1.4.2, with the trivial cases of sizes 0 and equal sizes)."""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    first = second = path[0]
    for value in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            first = node_hash(value, first)
            second = node_hash(value, second)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            second = node_hash(second, value)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and first == old_root and second == new_root
