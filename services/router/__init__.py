"""The router: takes inference requests off Kafka by priority and runs them on a pool."""
