"""`manage.py catalogue export|import|bootstrap` (streaming/catalogue/files.py), in-process on the test database: the
catalogue as a file that round-trips, imports that report exactly what changed, and files refused with the path of
each problem and nothing written. docs/operations.md, "Providers and models"."""

import io
import json
import re
import time
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from bench.servers import PROJECT_ROOT

from quotas.models import AuditEntry
from streaming.catalogue import registry
from streaming.catalogue.files import HEADER
from streaming.catalogue.models import Deployment, ModelPrice, Provider, ServedModel

pytestmark = pytest.mark.django_db

# The issue's example, with the second provider it names.
EXAMPLE = """\
providers:
  - name: local-vllm
    base_url: http://10.0.0.5:8000/v1
    api_key_env: VLLM_KEY
    token_limit_field: max_tokens
  - name: openrouter
    base_url: https://openrouter.ai/api/v1
    api_key_env: OPENROUTER_API_KEY
models:
  - name: qwen3-32b
    aliases: [default]
    deployments:
      - {provider: local-vllm, model: Qwen/Qwen3-32B, weight: 3}
      - {provider: openrouter, model: qwen/qwen3-32b, priority: 2}
"""

# Every field away from its default, as export writes it (the documented example in docs/operations.md).
FULL = HEADER + """\
providers:
  - name: local-vllm
    base_url: http://10.0.0.5:8000/v1
    api_key_env: VLLM_KEY
    token_limit_field: max_tokens
    limit_scope: provider
    connect_timeout: 2.0
    first_token_timeout: 30.0
  - name: openai
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
  - name: openrouter
    base_url: https://openrouter.ai/api/v1
    api_key_env: OPENROUTER_API_KEY
    enabled: false
  - name: simulator
models:
  - name: gpt-5-mini
    context_length: 400000
    field_rules:
      deny: [logit_bias]
      strip: [temperature, top_p]
    deployments:
      - {provider: openai, model: gpt-5-mini}
    prices:
      - {from: '2026-01-01T00:00:00Z', input: '0.25', cached_input: '0.025', output: '2'}
      - {from: '2026-12-01T00:00:00Z', input: '0.2', output: '1.6', reasoning: '1.6'}
  - name: qwen3-32b
    aliases: [default, qwen]
    context_length: 32768
    deployments:
      - {provider: local-vllm, model: Qwen/Qwen3-32B, weight: 3}
      - {provider: simulator, model: sim-large}
      - {provider: openrouter, model: qwen/qwen3-32b, priority: 2, enabled: false}
  - name: sim-small
    enabled: false
    deployments:
      - {provider: simulator, model: sim-small}
"""


def test_the_documented_example_is_an_export():
    """docs/operations.md's example, without its comments, is FULL: what the tests import and export."""
    docs = (PROJECT_ROOT / "docs/operations.md").read_text()
    example = re.search(r"### The catalogue as a file\n.*?```yaml\n(.*?)```", docs, re.S).group(1)
    assert re.sub(r" +# .*$", "", example, flags=re.M) == FULL


def catalogue(*args, stdin=None, stderr=None):
    out = io.StringIO()
    call_command("catalogue", *map(str, args), stdout=out, stderr=stderr or io.StringIO(),
                 **({"stdin": io.StringIO(stdin)} if stdin is not None else {}))
    return out.getvalue()


def write(tmp_path, text, name="catalogue.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def state():
    """Every record with every column (updated_at too: a record saved unchanged would show), and the audit trail."""
    return [list(model.objects.order_by("pk").values())
            for model in (Provider, ServedModel, Deployment, ModelPrice, AuditEntry)]


def refused(path, *options):
    with pytest.raises(CommandError) as refusal:
        catalogue("import", path, *options)
    assert "nothing written" in str(refusal.value)
    return str(refusal.value)


def test_the_issues_example_creates_its_records_and_the_gateway_routes_by_them(tmp_path):
    out = catalogue("import", write(tmp_path, EXAMPLE))

    assert out.splitlines() == [
        "provider local-vllm: created", "provider openrouter: created", "model qwen3-32b: created",
        "deployment qwen3-32b: local-vllm/Qwen/Qwen3-32B: created",
        "deployment qwen3-32b: openrouter/qwen/qwen3-32b: created", "5 created, 0 updated, 0 unchanged, 0 deleted"]
    vllm = Provider.objects.get(name="local-vllm")
    assert (vllm.base_url, vllm.api_key_env, vllm.token_limit_field, vllm.limit_scope, vllm.enabled) == (
        "http://10.0.0.5:8000/v1", "VLLM_KEY", "max_tokens", "deployment", True)
    assert ServedModel.objects.get().aliases == ["default"]
    assert set(Deployment.objects.values_list("model__name", "provider__name", "upstream_model", "weight",
                                              "priority")) == {("qwen3-32b", "local-vllm", "Qwen/Qwen3-32B", 3, 1),
                                                               ("qwen3-32b", "openrouter", "qwen/qwen3-32b", 1, 2)}
    model = registry.current_sync().model("default")
    assert model.name == "qwen3-32b"
    assert [(d.provider, d.upstream_model, d.weight, d.priority) for d in model.deployments] == [
        ("local-vllm", "Qwen/Qwen3-32B", 3, 1), ("openrouter", "qwen/qwen3-32b", 1, 2)]


def test_an_exported_file_imports_as_a_no_op_and_exports_byte_identical(tmp_path):
    catalogue("import", write(tmp_path, FULL))
    assert catalogue("export") == FULL  # sorted, defaults left out, deployments by priority then provider
    before = state()

    for name in ("again.yaml", "again.json"):
        path = tmp_path / name
        catalogue("export", path)
        assert catalogue("import", path) == "0 created, 0 updated, 14 unchanged, 0 deleted\n"
        assert state() == before
        catalogue("export", tmp_path / f"re-{name}")
        assert (tmp_path / f"re-{name}").read_bytes() == path.read_bytes()
    assert json.loads((tmp_path / "again.json").read_text())["models"][1]["deployments"][2] == {
        "provider": "openrouter", "model": "qwen/qwen3-32b", "priority": 2, "enabled": False}


def test_stdin_and_stdout_with_a_format(tmp_path):
    catalogue("import", "-", stdin=EXAMPLE)
    exported = catalogue("export", "-", "--format", "json")
    assert json.loads(exported)["providers"][0]["name"] == "local-vllm"
    assert catalogue("import", "-", "--format", "json", stdin=exported).endswith("5 unchanged, 0 deleted\n")
    with pytest.raises(CommandError, match="name it .yaml, .yml or .json, or give --format"):
        catalogue("import", write(tmp_path, EXAMPLE, "catalogue.txt"))


def test_a_changed_weight_is_reported_as_exactly_that_change(tmp_path):
    catalogue("import", write(tmp_path, EXAMPLE))
    changed = write(tmp_path, EXAMPLE.replace("weight: 3", "weight: 5"))

    assert catalogue("import", changed).splitlines() == [
        "deployment qwen3-32b: local-vllm/Qwen/Qwen3-32B: updated", "  weight: 3 → 5",
        "0 created, 1 updated, 4 unchanged, 0 deleted"]
    deployment = Deployment.objects.get(provider__name="local-vllm")
    assert deployment.weight == 5
    # In the audit trail, as an edit in the admin would be.
    entry = AuditEntry.objects.get(target_type="streaming.deployment", action="limits_changed")
    assert (entry.actor, entry.target_id, entry.old, entry.new) == (None, str(deployment.pk), {"weight": 3},
                                                                    {"weight": 5})
    assert AuditEntry.objects.filter(action="created").count() == 5
    # Verbosity 2 lists the unchanged records too.
    assert "provider openrouter: unchanged" in catalogue("-v", "2", "import", changed)


def test_a_field_left_out_takes_its_default(tmp_path):
    catalogue("import", write(tmp_path, EXAMPLE))
    out = catalogue("import", write(tmp_path, EXAMPLE.replace("    token_limit_field: max_tokens\n", "")))
    assert out.splitlines()[:2] == ["provider local-vllm: updated", '  token_limit_field: "max_tokens" → "auto"']


def test_a_dry_run_reports_and_writes_nothing(tmp_path):
    out = catalogue("import", write(tmp_path, EXAMPLE), "--dry-run")
    assert out.splitlines()[-1] == "5 created, 0 updated, 0 unchanged, 0 deleted (dry run: nothing written)"
    assert state() == [[], [], [], [], []]

    catalogue("import", tmp_path / "catalogue.yaml")
    before = state()
    out = catalogue("import", write(tmp_path, EXAMPLE.replace("[default]", "[default, qwen]")), "--dry-run")
    assert out.splitlines()[:2] == ["model qwen3-32b: updated", '  aliases: ["default"] → ["default", "qwen"]']
    assert state() == before


def test_only_prune_deletes_what_the_file_leaves_out(tmp_path):
    path = write(tmp_path, EXAMPLE)
    catalogue("import", path)
    spare = Provider.objects.create(name="spare", base_url="http://10.0.0.9/v1")
    old = ServedModel.objects.create(name="old")
    Deployment.objects.create(model=old, provider=spare, upstream_model="old-1")
    Deployment.objects.create(model=ServedModel.objects.get(name="qwen3-32b"), provider=spare, upstream_model="q")
    before = state()

    assert catalogue("import", path).endswith("0 deleted\n")
    assert catalogue("import", path, "--prune", "--dry-run").endswith("4 deleted (dry run: nothing written)\n")
    assert state() == before

    out = catalogue("import", path, "--prune")
    assert out.splitlines() == ["deployment old: spare/old-1: deleted", "deployment qwen3-32b: spare/q: deleted",
                                "model old: deleted", "provider spare: deleted",
                                "0 created, 0 updated, 5 unchanged, 4 deleted"]
    assert sorted(Provider.objects.values_list("name", flat=True)) == ["local-vllm", "openrouter"]
    assert list(ServedModel.objects.values_list("name", flat=True)) == ["qwen3-32b"]
    assert Deployment.objects.count() == 2
    assert sorted(AuditEntry.objects.filter(action="removed").values_list("target_repr", flat=True)) == [
        "old", "spare", "spare/old-1", "spare/q"]


# Each broken file also creates a provider and changes a priority: neither may be written.
BROKEN = EXAMPLE.replace("priority: 2", "priority: 3").replace(
    "models:", "  - name: spare\n    base_url: http://10.0.0.9/v1\nmodels:")


@pytest.mark.parametrize("old, new, problem", [
    ("{provider: openrouter,", "{provider: nowhere,", "models[0].deployments[1].provider: unknown provider 'nowhere'"),
    ("- name: qwen3-32b", "- name: qwen 3", "models[0].name: Letters, digits and . _ : / @ + -"),
    ("[default]", "[default, 'a b']", "models[0].aliases: "),
    ("[default]", "[default, qwen3-32b]", "models[0].aliases: An alias cannot be the model's own name."),
    ("[default]", "[default]\n    field_rules: {deny: logit_bias}",
     "models[0].field_rules: 'deny' must be a list of field names"),
    ("[default]", "[default]\n    field_rules: {strip: [messages]}",
     "models[0].field_rules: 'strip' names 'messages', which every request needs"),
    ("[default]", "[default]\n    field_rules: {allow: [seed]}",
     "models[0].field_rules: the rule must be an object with \"deny\" and/or \"strip\" lists"),
    ("token_limit_field: max_tokens", "token_limit_feild: max_tokens", "providers[0].token_limit_feild: unknown field"),
    ("token_limit_field: max_tokens", "token_limit_field: max_toks",
     "providers[0].token_limit_field: Value 'max_toks' is not a valid choice."),
    ("http://10.0.0.5:8000/v1", "10.0.0.5:8000", "providers[0].base_url: Enter a valid URL."),
    ("weight: 3}", "weight: three}", 'models[0].deployments[0].weight: must be an integer, got "three"'),
    ("weight: 3}", "weight: 0}", "models[0].deployments[0].weight: Ensure this value is greater than or equal to 1."),
    ("weight: 3}", "weight: 3, enabled: 1}", "models[0].deployments[0].enabled: must be true or false, got 1"),
    ("[default]", "default", 'models[0].aliases: must be a list, got "default"'),
    ("model: Qwen/Qwen3-32B, ", "", "models[0].deployments[0].model: required"),
    ("{provider: openrouter, model: qwen/qwen3-32b,", "{provider: local-vllm, model: Qwen/Qwen3-32B,",
     "models[0].deployments[1]: a second deployment on local-vllm/Qwen/Qwen3-32B"),
    ("- name: openrouter", "- name: local-vllm", "providers[1].name: a second provider named 'local-vllm'"),
    ("api_key_env: VLLM_KEY", "api_key: sk-live-123",
     "providers[0].api_key: only `stored` (the key stored in the database, kept as it is)"),
    ("models:", "model:", "model: unknown section (expected providers, models)"),
    ("[default]", "[default", "(document): not valid YAML"),
])
def test_each_problem_is_reported_with_its_path_and_nothing_is_written(tmp_path, old, new, problem):
    catalogue("import", write(tmp_path, EXAMPLE))
    before = state()
    assert BROKEN.count(old) == 1
    assert problem in refused(write(tmp_path, BROKEN.replace(old, new), "broken.yaml"))
    assert state() == before


def test_a_name_or_alias_means_one_model(tmp_path):
    catalogue("import", write(tmp_path, EXAMPLE))
    ServedModel.objects.create(name="llama", aliases=["fast"])
    second = "  - name: other\n    aliases: [fast, default]\n"
    message = refused(write(tmp_path, EXAMPLE + second, "two.yaml"))
    assert "models[1].aliases: 'fast' is already a name or alias of model 'llama'" in message
    assert "models[1].aliases: 'default' is already a name or alias of model 'qwen3-32b'" in message
    # With --prune, llama goes: its alias is free.
    out = catalogue("import", write(tmp_path, EXAMPLE + "  - name: other\n    aliases: [fast]\n", "ok.yaml"), "--prune")
    assert out.splitlines()[:2] == ["model other: created", "model llama: deleted"]


def test_prune_refuses_to_leave_a_deployment_without_its_provider(tmp_path):
    catalogue("import", write(tmp_path, EXAMPLE))
    before = state()
    only_one = EXAMPLE.split("  - name: openrouter")[0]  # no models section: the models stay, as they are
    message = refused(write(tmp_path, only_one, "providers.yaml"), "--prune")
    assert "providers: 'openrouter' is left out, but a deployment of model 'qwen3-32b' that stays uses it" in message
    message = refused(write(tmp_path, only_one + EXAMPLE[EXAMPLE.index("models:"):], "both.yaml"), "--prune")
    assert ("models[0].deployments[1].provider: unknown provider 'openrouter' (not in the file, so --prune deletes "
            "it)") in message
    assert state() == before


def test_a_stored_key_is_never_exported_and_import_keeps_it(tmp_path):
    catalogue("import", write(tmp_path, EXAMPLE))
    provider = Provider.objects.get(name="openrouter")
    provider.set_api_key("sk-or-v1-a-very-secret-value")
    provider.save()
    token = provider.api_key_encrypted

    exported = {fmt: catalogue("export", "-", "--format", fmt) for fmt in ("yaml", "json")}
    for text in exported.values():
        assert "a-very-secret-value" not in text and token not in text
    assert "    api_key_env: OPENROUTER_API_KEY\n    api_key: stored\n" in exported["yaml"]
    assert json.loads(exported["json"])["providers"][1]["api_key"] == "stored"

    for text in (exported["yaml"], EXAMPLE):  # the marker, or no mention of a key: the stored key stays
        assert catalogue("import", "-", stdin=text).endswith("0 updated, 5 unchanged, 0 deleted\n")
        provider.refresh_from_db()
        assert provider.stored_api_key() == "sk-or-v1-a-very-secret-value"

    # The marker for a provider with no stored key: imported, with a warning.
    err = io.StringIO()
    catalogue("import", "-", stdin=exported["yaml"].replace("openrouter", "elsewhere"), stderr=err)
    assert "providers[1].api_key: provider 'elsewhere' has no stored key: set one in the admin" in err.getvalue()
    assert Provider.objects.get(name="elsewhere").api_key_encrypted == ""


def test_bootstrap_writes_the_settings_catalogue_once(settings):
    settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY = "http://10.0.0.7:8000/v1", ""
    settings.SLUICE_MODELS = ["m1", "m2", "m1"]

    assert catalogue("bootstrap") == "Wrote provider default (http://10.0.0.7:8000/v1) serving m1, m2.\n"
    assert catalogue("bootstrap").startswith("The catalogue has providers already: nothing written")
    assert catalogue("export") == HEADER + (
        "providers:\n  - name: default\n    base_url: http://10.0.0.7:8000/v1\n    limit_scope: provider\n"
        "models:\n  - name: m1\n    deployments:\n      - {provider: default, model: m1}\n"
        "  - name: m2\n    deployments:\n      - {provider: default, model: m2}\n")


def test_prices_are_added_never_changed_and_left_alone_by_prune(tmp_path):
    catalogue("import", write(tmp_path, FULL))
    prices = ModelPrice.objects.order_by("effective_from")
    assert [(p.input, p.cached_input, p.output, p.reasoning) for p in prices] == [
        (Decimal("0.25"), Decimal("0.025"), Decimal("2"), None), (Decimal("0.2"), None, Decimal("1.6"), Decimal("1.6"))]
    assert registry.current_sync().model("gpt-5-mini").price_at(time.time()).output == Decimal("1.6")
    # The stored price from a time may not change; a new one from a later time is added.
    message = refused(write(tmp_path, FULL.replace("input: '0.2'", "input: '0.3'"), "changed.yaml"))
    assert "models[0].prices[1]: the price from 2026-12-01T00:00:00Z differs from the stored one" in message
    later = FULL.replace("reasoning: '1.6'}", "reasoning: '1.6'}\n      - {from: 2027-01-01T00:00:00Z, input: 0.1, "
                                               "output: 0.8}")
    out = catalogue("import", write(tmp_path, later, "later.yaml"), "--prune")
    assert "price gpt-5-mini from 2027-01-01T00:00:00Z: created" in out and "deleted" not in out.replace("0 deleted", "")
    # Left out of a file, with --prune: the history stays.
    catalogue("import", write(tmp_path, FULL.replace(FULL[FULL.index("    prices:"):FULL.index("  - name: qwen3-32b")],
                                                     ""), "none.yaml"), "--prune")
    assert ModelPrice.objects.count() == 3
    for problem, text in (("models[0].prices[0].input: must be a number ≥ 0", "input: '-1'"),
                          ("models[0].prices[0].from: required", "from: 'yesterday'")):
        broken = FULL.replace("input: '0.25'" if "input" in text else "from: '2026-01-01T00:00:00Z'", text)
        assert problem in refused(write(tmp_path, broken, "broken.yaml"))


# A price with a cache-write rate, as Anthropic bills its models (through OpenRouter here).
CACHE_WRITES = EXAMPLE + """\
    prices:
      - {from: '2026-01-01T00:00:00Z', input: '3', cached_input: '0.3', cache_write: '3.75', output: '15'}
"""


def test_a_cache_write_rate_round_trips(tmp_path):
    catalogue("import", write(tmp_path, CACHE_WRITES))
    price = ModelPrice.objects.get()
    assert (price.input, price.cached_input, price.cache_write, price.output, price.reasoning) == (
        Decimal("3"), Decimal("0.3"), Decimal("3.75"), Decimal("15"), None)
    assert registry.current_sync().model("qwen3-32b").price_at(time.time()).cache_write == Decimal("3.75")
    exported = catalogue("export")
    assert exported.endswith(CACHE_WRITES)  # the rates in the file's order: export writes them so
    assert catalogue("import", "-", stdin=exported).endswith("0 updated, 6 unchanged, 0 deleted\n")
    assert json.loads(catalogue("export", "-", "--format", "json"))["models"][0]["prices"][0]["cache_write"] == "3.75"
    # Like any rate, it is never changed at the same time, and must be a number.
    message = refused(write(tmp_path, CACHE_WRITES.replace("cache_write: '3.75'", "cache_write: '4'"), "changed.yaml"))
    assert "models[0].prices[0]: the price from 2026-01-01T00:00:00Z differs from the stored one" in message
    broken = write(tmp_path, CACHE_WRITES.replace("'3.75'", "'-1'").replace("2026-01", "2027-01"), "broken.yaml")
    assert "models[0].prices[0].cache_write: must be a number ≥ 0" in refused(broken)


def test_a_file_written_before_cache_write_rates_imports_as_it_did(tmp_path):
    catalogue("import", write(tmp_path, FULL))
    assert [price.cache_write for price in ModelPrice.objects.all()] == [None, None]
    # Billed at the input rate; exported without the key, so the file is unchanged.
    price = registry.current_sync().model("gpt-5-mini").price_at(time.time())
    assert price.cache_write is None and price.per_token("cache_write") == price.per_token("input")
    assert catalogue("export") == FULL
