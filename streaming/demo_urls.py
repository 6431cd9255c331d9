"""URLs of the browser demo (the chat page and its session-authenticated endpoints)."""

urlpatterns = []
