"""Observability for edgevlm: tracing, metrics, energy and reports. Imports neither server nor models."""
