"""Inference side of edgevlm: registry, llama.cpp engine, images, vision and reduction mechanisms."""
