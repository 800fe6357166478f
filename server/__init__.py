"""HTTP side of edgevlm: OpenAI wire types, routes, scheduling and middleware policy."""

__version__ = "0.1.0"
