"""pie: a programmable LLM serving system. Inferlets drive the model token by token."""

__version__ = "0.1.0"
