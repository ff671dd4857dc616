"""Speculative decoding: drafters propose, one target forward verifies, pure functions accept."""
