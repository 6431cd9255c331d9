"""The chat page's conversations, kept on the server per user (docs/demo.md, "Conversations").

models.py holds them; services.py writes and selectors.py reads (the page's JSON endpoints,
streaming/gateway/conversations.py, are a thin interface over both).
"""
