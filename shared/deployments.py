"""The names of the inference service's Serve deployments: the ops loop sizes them by name
(``ops.scaling``, ``model.status``), so both sides read them from here."""

CHAT_DEPLOYMENT = "ChatDeployment"
EMBEDDINGS_DEPLOYMENT = "EmbeddingsDeployment"
