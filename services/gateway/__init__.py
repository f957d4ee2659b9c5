"""The gateway: the OpenAI-compatible edge (authentication, policy, limits) of the mesh."""
