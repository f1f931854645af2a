"""End-to-end tests against a real `transformers serve` (need the `integration` extra)."""
