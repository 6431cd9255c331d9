"""The gateway's routes: the OpenAI-compatible API, the browser demo and its session endpoints, /metrics, the probes,
the API's OpenAPI document."""

from django.urls import path, re_path

from . import conversations, demo, health, metrics_endpoint, views

urlpatterns = [
    path("v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("v1/responses", views.responses, name="responses"),
    path("v1/completions", views.text_completions, name="completions"),
    path("v1/embeddings", views.embeddings, name="embeddings"),
    path("v1/models", views.models, name="models"),
    path("v1/models/<path:model>", views.model, name="model"),
    path("v1/quota", views.quota, name="quota"),
    re_path(r"^v1/(?P<path>.*)$", views.unknown),
    path("", demo.chat_page, name="demo-chat"),
    path("api/chat", demo.chat, name="demo-api-chat"),
    path("api/quota", demo.quota, name="demo-api-quota"),
    path("api/conversations", conversations.collection, name="demo-api-conversations"),
    path("api/conversations/<int:conversation_id>", conversations.item, name="demo-api-conversation"),
    path("api/conversations/<int:conversation_id>/messages", conversations.messages,
         name="demo-api-conversation-messages"),
    path("metrics", metrics_endpoint.metrics, name="metrics"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("openapi.json", views.openapi_document, name="openapi"),
]
