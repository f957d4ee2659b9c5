"""The knowledge base: ingestion, chunking, embeddings, hybrid search, RAG context."""
