"""The catalogue: providers, the models clients ask for, and the deployments that serve them (docs/operations.md,
"Providers and models"). Records in the database (models.py), one in-memory snapshot per process refreshed within
seconds of a change (registry.py), and the choice among a model's deployments (routing.py)."""
