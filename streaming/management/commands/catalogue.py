"""`manage.py catalogue export [FILE]`, `import FILE [--dry-run] [--prune]` and `bootstrap`: the catalogue of
providers and models as a YAML or JSON file, so that it can live in a repository (streaming/catalogue/files.py;
docs/operations.md, "Providers and models")."""

import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from streaming.catalogue import files, registry
from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel
from streaming.catalogue.snapshot import bootstrap_provider
from streaming.console import audit
from streaming.gateway.validation import field_rules_problem

FORMATS = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
AUDITED = {Provider: audit.PROVIDER_FIELDS, ServedModel: audit.MODEL_FIELDS, Deployment: audit.DEPLOYMENT_FIELDS,
           ModelPrice: audit.PRICE_FIELDS}


class Command(BaseCommand):
    help = "Export the catalogue of providers and models to a file, import one (upsert), or bootstrap it."
    stealth_options = ("stdin",)

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True)
        export = actions.add_parser("export", help="Write the catalogue (never a stored key) to FILE or stdout.")
        export.add_argument("file", nargs="?", default="-", help="A .yaml, .yml or .json file; - (default): stdout.")
        imports = actions.add_parser("import", help="Create or update the file's records; report what changed.")
        imports.add_argument("file", help="A .yaml, .yml or .json file; -: stdin.")
        imports.add_argument("--dry-run", action="store_true", help="Report what would change; write nothing.")
        imports.add_argument("--prune", action="store_true",
                             help="Also delete the records the file leaves out (of the sections it has).")
        for sub in (export, imports):
            sub.add_argument("--format", dest="fmt", choices=["yaml", "json"],
                             help="Default: by the file's extension; YAML for -.")
        actions.add_parser("bootstrap", help="Write the settings' provider and models while the catalogue is empty.")

    def handle(self, *, action, **options):
        getattr(self, f"_{action}")(**options)

    def _export(self, *, file, fmt, **_):
        document = files.export()
        text = files.dump(document, _format(file, fmt))
        if file == "-":
            self.stdout.write(text, ending="")
        else:
            Path(file).write_text(text, encoding="utf-8")
        if not document["providers"]:
            self.stderr.write("The catalogue is empty: the settings serve as it until a server's first start (or "
                              "`manage.py catalogue bootstrap`) writes them as records.")

    def _import(self, *, file, fmt, dry_run, prune, verbosity, **options):
        text = _read(file, options.get("stdin") or sys.stdin)
        try:
            with transaction.atomic():
                plan = files.plan(files.read(text, _format(file, fmt)), field_rules_problem, prune=prune)
                if not dry_run:
                    files.apply(plan, _audit_save, _audit_delete)
        except files.Invalid as exc:
            count = len(exc.problems)
            raise CommandError(f"{file}: {count} problem{'s' * (count != 1)}, nothing written:\n  "
                               + "\n  ".join(exc.problems)) from None
        for warning in plan.warnings:
            self.stderr.write(f"warning: {warning}")
        for change in plan.changes:
            if change.action != "unchanged" or verbosity > 1:
                self.stdout.write(str(change))
        self.stdout.write(plan.summary() + (" (dry run: nothing written)" if dry_run else ""))

    def _bootstrap(self, verbosity=1, **_):
        if not registry.bootstrap():
            if verbosity:
                self.stdout.write("The catalogue has providers already: nothing written (the database is the one "
                                  "source of truth: edit it in the admin, or import a file).")
            return
        provider = bootstrap_provider()
        self.stdout.write(f"Wrote provider {provider['name']} ({provider['base_url'] or 'the built-in simulator'}) "
                          f"serving {', '.join(dict.fromkeys(settings.SLUICE_MODELS))}.")


def _audit_save(record, before):
    """In the audit trail like an edit in the admin, with no one as its author (the command line has none)."""
    fields = AUDITED[type(record)]
    if entry := audit.saved(None, record, before and audit.values(before, fields), audit.values(record, fields)):
        entry.save()


def _audit_delete(record):
    audit.removed(None, record, audit.values(record, AUDITED[type(record)])).save()


def _format(file, given):
    if given:
        return given
    if file == "-":
        return "yaml"
    if fmt := FORMATS.get(Path(file).suffix.lower()):
        return fmt
    raise CommandError(f"{file}: name it .yaml, .yml or .json, or give --format.")


def _read(file, stdin):
    if file == "-":
        return stdin.read()
    try:
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"{file}: {exc}") from None
