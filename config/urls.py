from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("streaming.gateway.urls")),
]

# OpenAI error JSON under /v1/ and /api/ for what Django refuses itself; its own pages elsewhere.
handler400 = "streaming.gateway.views.bad_request"
handler403 = "streaming.gateway.views.permission_denied"
handler404 = "streaming.gateway.views.page_not_found"
handler500 = "streaming.gateway.views.server_error"
