"""The audit service's storage and tamper evidence.

- :mod:`~services.audit.merkle`: RFC 6962 Merkle tree hashing, proofs and their verification.
- :mod:`~services.audit.records`: what a record is, how events are parsed, queries and pages.
- :mod:`~services.audit.store`: the append-only store interface and :func:`open_store`;
  :mod:`~services.audit.sqlite_store` (embedded) and :mod:`~services.audit.opensearch_store`
  (cluster) implement it.
- :mod:`~services.audit.checkpoint`: Ed25519-signed checkpoints and record seals.
- :mod:`~services.audit.log`: :class:`AuditLog`, the store with its tree and signer: what the
  service appends to, checkpoints and proves from.
- :mod:`~services.audit.proofs`: inclusion, consistency and record proofs as JSON-able data.
- :mod:`~services.audit.verify`: offline verification (``meshllm audit verify``), rendered by
  :mod:`~services.audit.render`.
- :mod:`~services.audit.settings`: :class:`AuditSettings`.
"""
