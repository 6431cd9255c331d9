from django.contrib import admin
from django.urls import include, path, re_path

from streaming import views

urlpatterns = [
    path("v1/chat/completions", views.chat_completions, name="chat-completions"),
    path("v1/models", views.models, name="models"),
    path("v1/quota", views.quota, name="quota"),
    re_path(r"^v1/(?P<path>.*)$", views.unknown),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("quotas.urls")),
    path("", include("streaming.demo_urls")),
]

handler500 = "streaming.views.server_error"
