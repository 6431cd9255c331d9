"""Misconfiguration stops the server at start-up with a check that names the variable and the fix."""

import os
import subprocess
import sys

import pytest

from bench.servers import PROJECT_ROOT


def check(**env):
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": "", "REDIS_URL": "",
                   "OPENAI_BASE_URL": "", **env}
    return subprocess.run([sys.executable, "manage.py", "check"], cwd=PROJECT_ROOT, env=environment,
                          capture_output=True, text=True, timeout=60)


def test_the_defaults_pass():
    result = check()
    assert result.returncode == 0, result.stderr


def test_offline_commands_run_without_a_secret_key_and_the_deploy_check_names_it():
    assert check(DJANGO_SECRET_KEY="").returncode == 0  # migrate, makemigrations, create_api_key: no secret needed
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": "", "REDIS_URL": "",
                   "OPENAI_BASE_URL": "", "DJANGO_SECRET_KEY": ""}
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy"], cwd=PROJECT_ROOT, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "sluice.E001" in result.stderr and "HINT" in result.stderr


@pytest.mark.parametrize("env, check_id, named", [
    ({"DATABASE_URL": "mysql://root@127.0.0.1/sluice"}, "sluice.E002", "DATABASE_URL"),
    ({"REDIS_URL": "127.0.0.1:6379"}, "sluice.E003", "REDIS_URL"),
    ({"OPENAI_BASE_URL": "localhost:8001/v1"}, "sluice.E004", "OPENAI_BASE_URL"),
    ({"STREAM_STALL_TIMEOUT": "0"}, "sluice.E006", "STREAM_STALL_TIMEOUT"),
    ({"DB_THREADS": "0"}, "sluice.E006", "DB_THREADS"),
    ({"UPSTREAM_AIMD_DECREASE_FACTOR": "1.5"}, "sluice.E007", "UPSTREAM_AIMD_DECREASE_FACTOR"),
    ({"UPSTREAM_CONCURRENCY_MIN": "9", "UPSTREAM_CONCURRENCY_MAX": "4"}, "sluice.E008", "UPSTREAM_CONCURRENCY_MIN"),
    ({"SLUICE_EVENT_LOOP": "tokio"}, "sluice.E009", "SLUICE_EVENT_LOOP"),
    ({"SLUICE_LOOP_GATE_MS": "-5"}, "sluice.E012", "SLUICE_LOOP_GATE_MS"),
])
def test_misconfigurations_fail_with_a_named_check(env, check_id, named):
    result = check(**env)
    assert result.returncode != 0
    assert check_id in result.stderr and named in result.stderr
    assert "HINT" in result.stderr


def test_the_server_refuses_to_start_without_a_secret_key():
    environment = {**os.environ, "DJANGO_SECRET_KEY": "", "DATABASE_URL": ""}
    result = subprocess.run([sys.executable, "manage.py", "runserver", "--noreload", "127.0.0.1:0"],
                            cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "sluice.E001" in result.stderr


def test_secrets_do_not_reach_the_checks_output():
    result = check(OPENAI_API_KEY="sk-live-do-not-print-me-0123456789", DJANGO_SECRET_KEY="")
    assert "sk-live-do-not-print-me" not in result.stdout + result.stderr


def test_the_production_entry_point_refuses_to_start_without_a_secret_key():
    environment = {**os.environ, "DJANGO_SECRET_KEY": "", "DATABASE_URL": ""}
    result = subprocess.run([sys.executable, "-m", "streaming.server", "-p", "0", "config.asgi:application"],
                            cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "sluice.E001" in result.stderr and "DJANGO_SECRET_KEY" in result.stderr
