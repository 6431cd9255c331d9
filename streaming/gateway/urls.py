"""The gateway's routes: the OpenAI-compatible API, the browser demo and its session endpoints, /metrics, the probes,
the API's OpenAPI document."""

from django.urls import path, re_path

from . import demo, health, metrics_endpoint, views

urlpatterns = [
    path("v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("v1/models", views.models, name="models"),
    path("v1/quota", views.quota, name="quota"),
    re_path(r"^v1/(?P<path>.*)$", views.unknown),
    path("", demo.chat_page, name="demo-chat"),
    path("api/chat", demo.chat, name="demo-api-chat"),
    path("api/quota", demo.quota, name="demo-api-quota"),
    path("metrics", metrics_endpoint.metrics, name="metrics"),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("openapi.json", views.openapi_document, name="openapi"),
]
