"""Probes: concept datasets, activation extraction, RFM and linear probes, concept packs."""
