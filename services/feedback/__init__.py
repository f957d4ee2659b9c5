"""The feedback service: rated answers joined with the audit log, and datasets built from them."""
