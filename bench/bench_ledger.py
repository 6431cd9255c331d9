"""The ledger on PostgreSQL (issue 20, item 4): how many requests a second it sustains with several processes, and
its writes per request.

Each request a gateway serves writes its ledger row through quotas/domain/ledger.py: the row inserted at admission
(`open_ledger`), its progress and heartbeat (`record_progress`, once per lease renewal and per block leased: twice
here, what a 200-token stream does), and its settlement (`close_ledger`: the row's update and the day's roll-up, one
transaction). This bench runs exactly those functions, in N processes at once against one PostgreSQL database
(each process its own connection, as each gateway process has DB_THREADS of them), for a few seconds, and reports
requests per second (each one its four functions) and the SQL statements and transactions per request, counted with
Django's own query log. It isolates the ledger from everything else a request costs, so its figure is the ceiling
the ledger puts on a fleet; docs/performance.md compares it with what one gateway process serves.

`python -m bench.bench_ledger [--processes 1 2 4] [--seconds 5]` (PostgreSQL at DATABASE_URL, or the default
127.0.0.1:5432; a scratch database `sluice_bench_ledger` is created and dropped).
"""

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
import uuid

from .common import PROJECT_ROOT, PY, say, secret_key, table

BENCH_DB = "sluice_bench_ledger"
SERVER = os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432")
PROGRESS_WRITES = 2


def _setup_django(url):
    os.environ.update(DJANGO_SETTINGS_MODULE="config.settings", DATABASE_URL=url, DJANGO_SECRET_KEY=secret_key(),
                      REDIS_URL="", LOG_LEVEL="WARNING")
    sys.path.insert(0, str(PROJECT_ROOT))
    import django

    django.setup()


def one_request(user_id, ledger, Usage, timezone):
    """One request's ledger writes, as a gateway makes them for a 200-token stream."""
    from quotas.domain.policy import Limits, calendar_windows

    windows = calendar_windows(Limits(0, 0, 0, 0, 0, ()), timezone.now())
    row = ledger.ledger_row(request_id=f"req_{uuid.uuid4().hex}", user_id=user_id, api_key_id=None,
                            model="sim-small", stream=True, reserved_tokens=208, windows=windows)
    row.prompt_tokens = 8
    ledger.open_ledger.sync(row)
    for n in range(PROGRESS_WRITES):
        ledger.record_progress.sync(row.pk, 100 * (n + 1))
    ledger.close_ledger.sync(row, status=Usage.Status.COMPLETED, completion_tokens=200, charged_tokens=208)


def worker(url, user_id, seconds, start, results):
    _setup_django(url)
    from django.utils import timezone

    from quotas.domain import ledger
    from quotas.models import Usage

    start.wait()
    done, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        one_request(user_id, ledger, Usage, timezone)
        done += 1
    results.put(done)


def statements_per_request(url, user_id):
    """SQL statements (and BEGIN/COMMIT pairs) one request's writes send, from Django's query log."""
    _setup_django(url)
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from quotas.domain import ledger
    from quotas.models import Usage

    with CaptureQueriesContext(connection) as captured:
        one_request(user_id, ledger, Usage, timezone)
    sql = [q["sql"].split()[0].upper() for q in captured.captured_queries]
    return len([s for s in sql if s not in ("SAVEPOINT", "RELEASE")]), sql


def prepare():
    subprocess.run(["psql", f"{SERVER}/postgres", "-qc", f"DROP DATABASE IF EXISTS {BENCH_DB}"], check=True,
                   capture_output=True)
    subprocess.run(["psql", f"{SERVER}/postgres", "-qc", f"CREATE DATABASE {BENCH_DB}"], check=True,
                   capture_output=True)
    url = f"{SERVER}/{BENCH_DB}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": url,
           "DJANGO_SECRET_KEY": secret_key(), "REDIS_URL": ""}
    subprocess.run([PY, "manage.py", "migrate", "-v", "0"], cwd=PROJECT_ROOT, env=env, check=True)
    made = subprocess.run([PY, "-c", "import django; django.setup(); from django.contrib.auth import get_user_model; "
                                     "print(get_user_model().objects.create_user('ledger-bench').pk)"],
                          cwd=PROJECT_ROOT, env=env, check=True, capture_output=True, text=True)
    return url, int(made.stdout.strip().splitlines()[-1])


def run_level(url, user_id, processes, seconds):
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    workers = [context.Process(target=worker, args=(url, user_id, seconds, start, results)) for _ in range(processes)]
    for process in workers:
        process.start()
    time.sleep(2.0)  # let every process import Django and connect before the clock starts
    start.set()
    done = sum(results.get(timeout=seconds + 60) for _ in workers)
    for process in workers:
        process.join()
    return done / seconds


def run(levels=(1, 2, 4), seconds=5.0):
    url, user_id = prepare()
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            count, sql = pool.apply(statements_per_request, (url, user_id))
        rows = []
        for processes in levels:
            say(f"ledger bench: {processes} process(es) × {seconds:g} s on PostgreSQL")
            rate = run_level(url, user_id, processes, seconds)
            rows.append((processes, f"{rate:,.0f}", f"{rate * count:,.0f}"))
    finally:
        subprocess.run(["psql", f"{SERVER}/postgres", "-qc", f"DROP DATABASE IF EXISTS {BENCH_DB}"],
                       capture_output=True)
    print(f"\n## The ledger on PostgreSQL: {count} statements per request ({' '.join(sql)}), "
          f"{PROGRESS_WRITES} progress writes (a 200-token stream)\n")
    print(table(["processes", "requests/s", "statements/s"], rows, ["<", ">", ">"]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    run(tuple(args.processes), args.seconds)


if __name__ == "__main__":
    main()
