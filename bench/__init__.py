"""`python -m bench`: throughput of the SAE training step, reported against its FLOP count."""
