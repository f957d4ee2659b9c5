"""RFC 6962 hashing and proofs: published test vectors, a reference recursion, tampering."""

from __future__ import annotations

import hashlib

import pytest

from services.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleTree,
    ProofError,
    leaf_hash,
    node_hash,
    root_from_inclusion_proof,
    root_of,
    verify_consistency,
    verify_inclusion,
)

# The eight leaves of the Certificate Transparency / Trillian RFC 6962 test data, the roots
# of their first n leaves, and some of their proofs.
LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION_0_OF_8 = [
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
]
CONSISTENCY = {
    (1, 8): INCLUSION_0_OF_8,
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def _tree() -> MerkleTree:
    return MerkleTree(leaf_hash(leaf) for leaf in LEAVES)


def test_hashing_and_empty_tree() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert leaf_hash(b"") == hashlib.sha256(b"\x00").digest()
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()
    assert MerkleTree().root() == EMPTY_ROOT
    assert CompactRange().root() == EMPTY_ROOT


def test_roots_match_the_rfc6962_test_vectors() -> None:
    tree = _tree()
    for size, expected in enumerate(ROOTS, start=1):
        assert tree.root(size).hex() == expected
        assert root_of([leaf_hash(leaf) for leaf in LEAVES[:size]]).hex() == expected


def test_proofs_match_the_test_vectors() -> None:
    tree = _tree()
    assert [p.hex() for p in tree.inclusion_proof(0, 8)] == INCLUSION_0_OF_8
    for (old, new), expected in CONSISTENCY.items():
        assert [p.hex() for p in tree.consistency_proof(old, new)] == expected


def _reference_root(hashes: list[bytes]) -> bytes:
    """RFC 6962 section 2.1, literally."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(_reference_root(hashes[:k]), _reference_root(hashes[k:]))


MAX_N = 70
HASHES = [leaf_hash(i.to_bytes(4, "big")) for i in range(MAX_N)]
TREE = MerkleTree(HASHES)


def test_roots_match_the_reference_recursion_for_every_size() -> None:
    peaks = CompactRange()
    for n in range(MAX_N + 1):
        assert TREE.root(n) == _reference_root(HASHES[:n])
        assert peaks.root() == TREE.root(n)
        if n < MAX_N:
            peaks.append(HASHES[n])


def _flip(value: bytes) -> bytes:
    return bytes([value[0] ^ 1]) + value[1:]


def test_inclusion_proofs_verify_for_every_leaf_and_size_and_fail_when_tampered() -> None:
    for n in range(1, MAX_N + 1):
        root = TREE.root(n)
        for m in range(n):
            proof = TREE.inclusion_proof(m, n)
            assert verify_inclusion(HASHES[m], m, n, proof, root), (m, n)
            assert not verify_inclusion(_flip(HASHES[m]), m, n, proof, root)
            assert not verify_inclusion(HASHES[m], m, n, proof, _flip(root))
            if m + 1 < n:
                assert not verify_inclusion(HASHES[m], m + 1, n, proof, root)
            for i in range(len(proof)):
                broken = [*proof[:i], _flip(proof[i]), *proof[i + 1 :]]
                assert not verify_inclusion(HASHES[m], m, n, broken, root)
            if proof:
                assert not verify_inclusion(HASHES[m], m, n, proof[:-1], root)
            assert not verify_inclusion(HASHES[m], m, n, [*proof, HASHES[0]], root)


def test_consistency_proofs_verify_for_every_pair_and_fail_when_tampered() -> None:
    for n in range(1, MAX_N + 1):
        new_root = TREE.root(n)
        for m in range(n + 1):
            old_root = TREE.root(m)
            proof = TREE.consistency_proof(m, n)
            assert verify_consistency(m, n, old_root, new_root, proof), (m, n)
            if 0 < m < n:
                assert not verify_consistency(m, n, _flip(old_root), new_root, proof)
                assert not verify_consistency(m, n, old_root, _flip(new_root), proof)
                for i in range(len(proof)):
                    broken = [*proof[:i], _flip(proof[i]), *proof[i + 1 :]]
                    assert not verify_consistency(m, n, old_root, new_root, broken)
                assert not verify_consistency(m, n, old_root, new_root, proof[:-1])
                assert not verify_consistency(m, n, old_root, new_root, [*proof, HASHES[0]])
                if m > 1:
                    other = TREE.root(m - 1)
                    assert not verify_consistency(m - 1, n, other, new_root, proof)


def test_consistency_edge_cases() -> None:
    root = TREE.root(5)
    assert verify_consistency(0, 5, EMPTY_ROOT, root, [])
    assert verify_consistency(5, 5, root, root, [])
    assert not verify_consistency(5, 5, root, root, [root])
    assert not verify_consistency(6, 5, root, root, [])
    assert not verify_consistency(3, 5, TREE.root(3), root, [])


def test_bad_requests_raise() -> None:
    with pytest.raises(ProofError):
        TREE.inclusion_proof(5, 5)
    with pytest.raises(ProofError):
        TREE.inclusion_proof(0, MAX_N + 1)
    with pytest.raises(ProofError):
        TREE.consistency_proof(6, 5)
    with pytest.raises(ProofError):
        root_from_inclusion_proof(HASHES[0], 3, 2, [])
    with pytest.raises(ValueError, match="32 bytes"):
        MerkleTree().append(b"short")


def test_large_tree_matches_the_streaming_root() -> None:
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(5_000)]
    tree = MerkleTree(hashes)
    assert tree.root() == root_of(hashes)
    assert tree.root(4_097) == root_of(hashes[:4_097])
    assert verify_inclusion(hashes[4_321], 4_321, 5_000, tree.inclusion_proof(4_321), tree.root())
    proof = tree.consistency_proof(3_333, 5_000)
    assert verify_consistency(3_333, 5_000, tree.root(3_333), tree.root(), proof)
