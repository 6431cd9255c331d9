"""Operator endpoints outside the admin (metrics)."""

from django.urls import path

from . import views

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
]
