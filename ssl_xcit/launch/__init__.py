"""Cluster launch: the submitit job that survives pre-emption, and `ssl-xcit submit`."""
