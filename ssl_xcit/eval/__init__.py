"""Evaluation of frozen features: export to a feature store, k-NN, linear probes."""
