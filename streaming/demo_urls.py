"""URLs of the browser demo (the chat page and its session-authenticated endpoints)."""

from django.urls import path

from . import demo

urlpatterns = [
    path("", demo.chat_page, name="demo-chat"),
    path("api/chat", demo.chat, name="demo-api-chat"),
    path("api/quota", demo.quota, name="demo-api-quota"),
]
