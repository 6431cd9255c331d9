"""Sluice's simulated OpenAI-compatible provider (app.py), and its command line (__main__.py)."""
