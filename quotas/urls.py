"""Operator endpoints outside the admin (metrics)."""

urlpatterns = []
