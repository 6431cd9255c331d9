"""The catalogue's edits in quotas' audit trail (quotas.models.AuditEntry, shown by quotas/console/ledger.py): who
added, changed or removed which provider, model or deployment, and the fields from what to what. A provider's key
never appears: only where it comes from (`key_source`), and that it was replaced."""

from quotas.models import AuditEntry

Action = AuditEntry.Action

PROVIDER_FIELDS = ("name", "base_url", "api_key_env", "key_source", "token_limit_field", "limit_scope",
                   "connect_timeout", "first_token_timeout", "enabled")
MODEL_FIELDS = ("name", "aliases", "context_length", "field_rules", "enabled")
DEPLOYMENT_FIELDS = ("model", "provider", "upstream_model", "weight", "priority", "enabled")
PRICE_FIELDS = ("model", "effective_from", "input", "cached_input", "cache_write", "output", "reasoning")
KEY_REPLACED = "stored (encrypted): replaced"


def values(obj, fields, key_replaced=False):
    found = AuditEntry.values(obj, fields)
    if key_replaced:
        found["key_source"] = KEY_REPLACED  # a new key over a stored one: the source alone would not change
    return found


def saved(actor, target, old, new):
    """The entry for a record created (`old` None) or changed; None when no audited field changed. Changes are
    recorded as quotas' generic "changed" action (LIMITS_CHANGED)."""
    if old is None:
        return AuditEntry.entry(actor, Action.CREATED, target, new=new)
    changed = [name for name in new if old.get(name) != new[name]]
    if not changed:
        return None
    return AuditEntry.entry(actor, Action.LIMITS_CHANGED, target, {n: old.get(n) for n in changed},
                            {n: new[n] for n in changed})


def removed(actor, target, old):
    return AuditEntry.entry(actor, Action.REMOVED, target, old=old)
