"""Workloads and sweeps that drive a running server and read its traces."""
