"""The catalogue as a file (YAML or JSON) for `manage.py catalogue export|import`, so that it can live in a
repository and be reviewed, while the database stays the one source of truth (docs/operations.md, "Providers and
models", has the format).

Import is two steps, so that nothing is written unless the whole file is valid: `plan` checks the document (every
problem named by its path in the document) and compares it with the database; `apply` writes the plan. A record is
the whole of its entry: a field left out takes its default, which is also what export leaves out.

A key stored in the database (encrypted) never leaves it: export writes `api_key: stored` as a marker, and import
never sets nor clears a stored key (a key in a file would end up in a repository; api_key_env names a variable).
"""

import copy
import dataclasses
import datetime
import json
import math
from collections import Counter
from decimal import Decimal, InvalidOperation
from types import SimpleNamespace

import yaml
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.utils.dateparse import parse_datetime

from .models import Deployment, ModelPrice, Provider, ServedModel

STORED = "stored"  # the value of `api_key` for a provider whose key is stored in the database
HEADER = "# Sluice's catalogue: manage.py catalogue import FILE (docs/operations.md, \"Providers and models\").\n"

# (key in the document, the record's attribute, type), in the order export writes them.
PROVIDER = (("name", "name", str), ("base_url", "base_url", str), ("api_key_env", "api_key_env", str),
            ("token_limit_field", "token_limit_field", str), ("limit_scope", "limit_scope", str),
            ("connect_timeout", "connect_timeout", float), ("first_token_timeout", "first_token_timeout", float),
            ("enabled", "enabled", bool))
MODEL = (("name", "name", str), ("aliases", "aliases", list), ("context_length", "context_length", int),
         ("field_rules", "field_rules", dict), ("enabled", "enabled", bool))
DEPLOYMENT = (("provider", "provider", str), ("model", "upstream_model", str), ("weight", "weight", int),
              ("priority", "priority", int), ("enabled", "enabled", bool))
# A rate left out of a price's entry is empty (cached_input, cache_write, reasoning): a file written before a rate
# existed imports as it did.
PRICE_RATES = ("input", "cached_input", "cache_write", "output", "reasoning")
KINDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
         dict: "a mapping"}


class Invalid(Exception):
    """The document's problems, each as `path: what is wrong`; nothing was written."""

    def __init__(self, problems):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclasses.dataclass(frozen=True)
class Change:
    kind: str  # provider, model, deployment, price
    label: str
    action: str  # created, updated, unchanged, deleted
    diffs: tuple = ()  # (field, old, new)

    def __str__(self):
        lines = [f"{self.kind} {self.label}: {self.action}"]
        lines += [f"  {key}: {_show(old)} → {_show(new)}" for key, old, new in self.diffs]
        return "\n".join(lines)


@dataclasses.dataclass
class Plan:
    changes: list = dataclasses.field(default_factory=list)
    saves: list = dataclasses.field(default_factory=list)  # (record, as it was or None), parents before children
    deletions: list = dataclasses.field(default_factory=list)  # children before parents
    warnings: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        counts = Counter(change.action for change in self.changes)
        return ", ".join(f"{counts[action]} {action}" for action in ("created", "updated", "unchanged", "deleted"))


# Export


def export() -> dict:
    """The catalogue as a document: sorted by name, defaults left out, so that an unchanged catalogue exports the
    same bytes (and a change is a one-line diff)."""
    models = ServedModel.objects.prefetch_related("deployments__provider", "prices")
    return {"providers": [_provider_entry(p) for p in sorted(Provider.objects.all(), key=lambda p: p.name)],
            "models": [_model_entry(m) for m in sorted(models, key=lambda m: m.name)]}


def _provider_entry(provider):
    entry = _entry(provider, PROVIDER, Provider, required={"name"})
    if provider.api_key_encrypted:
        entry["api_key"] = STORED
    order = ["name", "base_url", "api_key_env", "api_key"] + [key for key, _, _ in PROVIDER]
    return {key: entry[key] for key in dict.fromkeys(order) if key in entry}


def _model_entry(model):
    entry = _entry(model, MODEL, ServedModel, required={"name"})
    if "field_rules" in entry:
        entry["field_rules"] = {kind: entry["field_rules"][kind] for kind in sorted(entry["field_rules"])}
    deployments = sorted(model.deployments.all(), key=lambda d: (d.priority, d.provider.name, d.upstream_model))
    if deployments:
        entry["deployments"] = [_Inline(_entry(d, DEPLOYMENT, Deployment, required={"provider", "model"}))
                                for d in deployments]
    prices = sorted(model.prices.all(), key=lambda p: p.effective_from)
    if prices:
        entry["prices"] = [_Inline(_price_entry(p)) for p in prices]
    return entry


def _price_entry(price):
    """`{from: 2026-12-01T00:00:00Z, input: '2.5', output: '10'}`: exact decimals as strings, the time in UTC."""
    entry = {"from": price.effective_from.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for rate in PRICE_RATES:
        value = getattr(price, rate)
        if value is not None:
            entry[rate] = _decimal_text(value)
    return entry


def _decimal_text(value):
    return format(Decimal(value).normalize(), "f")


def _entry(record, fields, model, required):
    entry = {}
    for key, attr, _ in fields:
        value = record.provider.name if attr == "provider" else getattr(record, attr)
        if key in required or value != _default(model, attr):
            entry[key] = value
    return entry


class _Inline(dict):
    """A deployment: one line, `{provider: a, model: b, weight: 3}`."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)  # list items indented under their key, as people write them

    def represent_list(self, data):
        flow = all(not isinstance(item, (dict, list)) for item in data)  # aliases, field rules: on one line
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(_Inline, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data,
                                                                               flow_style=True))


def dump(document, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    # No line wrapping: one deployment per line whatever its length, so that diffs stay line by line.
    return HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1 << 16,
                              default_flow_style=False)


# Import


def read(text: str, fmt: str):
    try:
        return json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise Invalid([f"(document): not valid {fmt.upper()}: {exc}"]) from None


def plan(document, rules_problem, prune: bool = False) -> Plan:
    """What importing `document` would change. `rules_problem` is the gateway's check of field rules (passed in:
    the catalogue sits below the gateway). With `prune`, records the document leaves out of a section it has are
    deleted. Raises Invalid with every problem found."""
    if not isinstance(document, dict):
        raise Invalid(["(document): must be a mapping with `providers` and `models` lists"])
    problems = [f"{key}: unknown section (expected providers, models)" for key in document
                if key not in ("providers", "models")]
    db, result = _database(), Plan()
    providers = _providers(_section(document, "providers", problems), db, problems, result)
    pruning = {key: prune and key in document for key in ("providers", "models")}
    usable = providers if pruning["providers"] else {**db.providers, **providers}
    models, kept = _models(_section(document, "models", problems), db, usable, rules_problem, problems, result)
    if pruning["models"]:
        _prune_models(db, models, kept, result)
    if pruning["providers"]:
        _prune_providers(db, providers, kept if pruning["models"] else set(db.deployments), problems, result)
    if not problems:
        others = [] if pruning["models"] else [m for name, m in db.models.items() if name not in models]
        _check_names(models, others, problems)
    if problems:
        raise Invalid(problems)
    return result


def apply(plan: Plan, on_save=None, on_delete=None):
    """Write the plan (in the transaction that read the database for it: the command's). `on_save(record, before)`
    and `on_delete(record)` hear of each write, for the audit trail."""
    for record, before in plan.saves:
        record.save()
        if on_save:
            on_save(record, before)
    for record in plan.deletions:
        if on_delete:
            on_delete(record)
        record.delete()


def _database():
    deployments = Deployment.objects.select_related("model", "provider")
    return SimpleNamespace(providers={p.name: p for p in Provider.objects.all()},
                           models={m.name: m for m in ServedModel.objects.all()},
                           deployments={(d.model.name, d.provider.name, d.upstream_model): d for d in deployments},
                           prices={(p.model.name, p.effective_from): p
                                   for p in ModelPrice.objects.select_related("model")})


def _section(document, key, problems, path=None):
    entries = document.get(key)
    if entries is None:
        return []
    if not isinstance(entries, list):
        problems.append(f"{path or key}: must be a list")
        return []
    return entries


def _providers(entries, db, problems, result):
    """{name: the record as the file has it, or None if its entry is invalid}."""
    providers = {}
    for i, entry in enumerate(entries):
        path = f"providers[{i}]"
        values = _values(entry, PROVIDER, Provider, path, problems, required={"name"}, extra={"api_key"})
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _unique(name, providers, path, "provider", problems):
            continue
        providers[name] = None
        record = db.providers.get(name)
        if "api_key" in entry and entry["api_key"] != STORED:
            problems.append(f"{path}.api_key: only `{STORED}` (the key stored in the database, kept as it is): a "
                            "key is never read from a file; name its environment variable in api_key_env")
        elif "api_key" in entry and not (record and record.api_key_encrypted):
            result.warnings.append(f"{path}.api_key: provider {name!r} has no stored key: set one in the admin")
        if values is not None:
            providers[name] = _upsert(record, Provider, values, PROVIDER, path, problems, result, "provider", name)
    return providers


def _models(entries, db, providers, rules_problem, problems, result):
    """The file's models ({name: (path, record or None)}) and the deployments it lists ({(model, provider,
    upstream model)})."""
    models, kept = {}, set()
    for i, entry in enumerate(entries):
        path = f"models[{i}]"
        values = _values(entry, MODEL, ServedModel, path, problems, required={"name"},
                         extra={"deployments", "prices"})
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _unique(name, models, path, "model", problems):
            continue
        model = None
        if values is not None:
            if values["field_rules"] and (problem := rules_problem({"*": values["field_rules"]})):
                problem = problem.replace(" for '*'", "")  # the check is for SLUICE_FIELD_RULES' patterns
                problems.append(f"{path}.field_rules: {problem}")
            model = _upsert(db.models.get(name), ServedModel, values, MODEL, path, problems, result, "model", name)
        models[name] = (path, model)
        for j, spec in enumerate(_section(entry, "deployments", problems, f"{path}.deployments")):
            where = f"{path}.deployments[{j}]"
            values = _values(spec, DEPLOYMENT, Deployment, where, problems, required={"provider", "model"})
            if values is None:
                continue
            key = (name, values["provider"], values["upstream_model"])
            if key[1] not in providers:
                why = " (not in the file, so --prune deletes it)" if key[1] in db.providers else ""
                problems.append(f"{where}.provider: unknown provider {key[1]!r}{why}")
            elif key in kept:
                problems.append(f"{where}: a second deployment on {key[1]}/{key[2]}")
            else:
                kept.add(key)
                # An invalid model or provider is reported already: its deployments are still checked.
                values.update(model=model or ServedModel(), provider=providers[key[1]] or Provider())
                _upsert(db.deployments.get(key), Deployment, values, DEPLOYMENT, where, problems, result,
                        "deployment", _label(key))
        for j, spec in enumerate(_section(entry, "prices", problems, f"{path}.prices")):
            _price(spec, name, model, f"{path}.prices[{j}]", db, problems, result)
    return models, kept


def _price(entry, name, model, path, db, problems, result):
    """A price is added, never changed (a ledger row keeps the one it used): one the database has at the same time
    must be the same; --prune leaves prices alone (they are the ledger's history)."""
    if not isinstance(entry, dict):
        problems.append(f"{path}: must be a mapping, got {_show(entry)}")
        return
    found = len(problems)
    for key in entry:
        if key not in ("from", *PRICE_RATES):
            problems.append(f"{path}.{key}: unknown field (expected one of from, {', '.join(PRICE_RATES)})")
    when = entry.get("from")
    # YAML reads an unquoted 2026-12-01T00:00:00Z as a time already.
    at = when if isinstance(when, datetime.datetime) else parse_datetime(when) if isinstance(when, str) else None
    if at is None:
        problems.append(f"{path}.from: required, a time such as 2026-12-01T00:00:00Z")
    elif at.tzinfo is None:
        at = at.replace(tzinfo=datetime.UTC)
    rates = {}
    for rate in PRICE_RATES:
        value = entry.get(rate)
        if value is None:
            if rate in ("input", "output"):
                problems.append(f"{path}.{rate}: required, per million tokens")
            rates[rate] = None
            continue
        try:
            number = Decimal(str(value)) if isinstance(value, (int, float, str)) and not isinstance(value, bool) \
                else None
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite() or number < 0:
            problems.append(f"{path}.{rate}: must be a number ≥ 0 per million tokens, got {_show(value)}")
        else:
            rates[rate] = number
    if len(problems) > found:
        return
    label = f"{name} from {at.astimezone(datetime.UTC):%Y-%m-%dT%H:%M:%SZ}"
    stored = db.prices.get((name, at))
    if stored is not None:
        if any(getattr(stored, r) != rates[r] for r in PRICE_RATES):
            problems.append(f"{path}: the price from {label.split(' from ')[1]} differs from the stored one; prices are never "
                            "changed (the ledger keeps the one each request used): add one with a later `from`")
        else:
            result.changes.append(Change("price", label, "unchanged"))
        return
    result.changes.append(Change("price", label, "created"))
    result.saves.append((ModelPrice(model=model or ServedModel(), effective_from=at, **rates), None))


def _prune_models(db, models, kept, result):
    """Every deployment the file does not list goes: of its models, and of the models it leaves out."""
    for key in sorted(set(db.deployments) - kept):
        _delete(db.deployments[key], "deployment", _label(key), result)
    for name in sorted(set(db.models) - set(models)):
        _delete(db.models[name], "model", name, result)


def _prune_providers(db, providers, staying, problems, result):
    """The providers the file leaves out go, unless a deployment that stays (of a model the file does not list)
    still uses one."""
    for name in sorted(set(db.providers) - set(providers)):
        users = sorted(key[0] for key in staying if key[1] == name)
        if users:
            problems.append(f"providers: {name!r} is left out, but a deployment of model {users[0]!r} that "
                            "stays uses it")
        else:
            _delete(db.providers[name], "provider", name, result)


def _check_names(models, others, problems):
    """A name or alias means one model (else clients get whichever the catalogue happened to find first)."""
    entries = [(m.name, m.aliases or [], None) for m in others]
    entries += [(name, record.aliases, path) for name, (path, record) in models.items()]
    owners = {name: name for name, _, _ in entries}
    for name, aliases, path in entries:
        for alias in aliases:
            owner = owners.setdefault(alias, name)
            if owner != name and path:
                problems.append(f"{path}.aliases: {alias!r} is already a name or alias of model {owner!r}")


def _values(entry, fields, model, path, problems, required, extra=()):
    """The entry's fields as the record's attributes (defaults for those left out), or None if any is unusable."""
    if not isinstance(entry, dict):
        problems.append(f"{path}: must be a mapping, got {_show(entry)}")
        return None
    known = [key for key, _, _ in fields] + list(extra)
    for key in entry:
        if key not in known:
            problems.append(f"{path}.{key}: unknown field (expected one of {', '.join(known)})")
    values, usable = {}, True
    for key, attr, kind in fields:
        if key not in entry:
            if key in required:
                problems.append(f"{path}.{key}: required")
                usable = False
            values[attr] = _default(model, attr)
        elif problem := _type_problem(entry[key], kind, model._meta.get_field(attr).null):
            problems.append(f"{path}.{key}: {problem}")
            usable = False
        else:
            values[attr] = entry[key]
    return values if usable else None


def _type_problem(value, kind, nullable):
    if value is None:
        return None if nullable else f"must be {KINDS[kind]}, not null"
    if isinstance(value, bool) != (kind is bool):
        ok = False
    elif kind is float:
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    return None if ok else f"must be {KINDS[kind]}, got {_show(value)}"


def _upsert(record, model, values, fields, path, problems, result, kind, label):
    """The record with the entry's values (a new one if none), its change noted; None if it does not validate."""
    parents = {attr: values[attr] for attr in ("model", "provider") if model is Deployment}
    created = record is None
    before = None if created else copy.copy(record)
    if created:
        record = model(**parents)
    diffs = []
    for key, attr, _ in fields:
        if attr in parents:
            continue
        if not created and getattr(record, attr) != values[attr]:
            diffs.append((key, getattr(record, attr), values[attr]))
        setattr(record, attr, values[attr])
    try:
        record.full_clean(exclude=["model", "provider"], validate_unique=False, validate_constraints=False)
    except ValidationError as exc:
        names = {attr: key for key, attr, _ in fields}
        for attr, messages in exc.message_dict.items():
            where = path if attr == NON_FIELD_ERRORS else f"{path}.{names.get(attr, attr)}"
            problems.extend(f"{where}: {message}" for message in messages)
        return None
    action = "created" if created else "updated" if diffs else "unchanged"
    result.changes.append(Change(kind, label, action, tuple(diffs)))
    if action != "unchanged":
        result.saves.append((record, before))
    return record


def _unique(name, seen, path, kind, problems):
    if name in seen:
        problems.append(f"{path}.name: a second {kind} named {name!r}")
        return False
    return True


def _delete(record, kind, label, result):
    result.changes.append(Change(kind, label, "deleted"))
    result.deletions.append(record)


def _default(model, attr):
    return model._meta.get_field(attr).get_default()


def _label(key):
    model, provider, upstream_model = key
    return f"{model}: {provider}/{upstream_model}"


def _show(value):
    return json.dumps(value, ensure_ascii=False, default=str)
