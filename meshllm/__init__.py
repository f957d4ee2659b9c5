"""The ``meshllm`` command: run the mesh, inspect it, manage its topics."""
