"""Benchmarks: a load generator, an end-to-end uplink run and the aiocoap baseline (not tests)."""
