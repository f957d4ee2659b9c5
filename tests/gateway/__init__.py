"""Tests of the gateway's domain: credentials, policy, limits, and the keys command."""
