"""The newcomer's first run: `./dev` and the README (issue 19, item 12)."""

import re
import subprocess

from bench.servers import PROJECT_ROOT

README = (PROJECT_ROOT / "README.md").read_text()
DEV = PROJECT_ROOT / "dev"


def run_dev(*args):
    return subprocess.run([str(DEV), *args], capture_output=True, text=True, timeout=30)


def test_an_unknown_command_fails_with_a_message_and_the_list():
    result = run_dev("demoo")
    assert result.returncode != 0
    assert "error: unknown command 'demoo'" in result.stderr
    assert "./dev demo" in result.stderr and "./dev test" in result.stderr


def test_help_lists_the_commands():
    for args in ((), ("help",), ("--help",)):
        result = run_dev(*args)
        assert result.returncode == 0, args
        assert "./dev demo" in result.stdout and "./dev test" in result.stdout and "./dev bench" in result.stdout


def test_the_demo_runs_the_simulator_like_a_model_and_the_tests_keep_it_plain():
    script = DEV.read_text()
    demo = script[script.index("  demo)"):script.index("  test)")]
    assert "export SIMULATOR_STYLE=${SIMULATOR_STYLE:-demo}" in demo
    for command in ("  test)", "  bench)"):
        section = script[script.index(command):]
        assert "unset SIMULATOR_STYLE" in section[:section.index(";;")]


def code_blocks(markdown):
    return re.findall(r"```\w*\n(.*?)```", markdown, re.S)


def test_the_readmes_first_screen_gives_exactly_two_commands():
    first_screen = README[:README.index("\n## ")]
    commands = [line.split("#")[0].strip() for block in code_blocks(first_screen) for line in block.splitlines()]
    assert commands == ["./dev demo", "./dev test"]


def test_the_readme_says_where_the_key_goes_how_to_stop_where_data_lives_and_how_to_reset():
    curl = README[README.index("## Or with curl"):]
    assert curl.index("export SLUICE_KEY=") < curl.index("$SLUICE_KEY")
    assert "Ctrl-C" in README
    assert "db.sqlite3" in README and "rm db.sqlite3" in README
    assert "create_api_key" in README and "not one more per run" in README
    assert not re.search(r"(?<!\.venv/bin/)\bpython manage\.py", README)  # hints name the venv's python
    postgres = next(block for block in code_blocks(README) if "DATABASE_URL=postgres" in block)
    lines = postgres.strip().splitlines()
    assert len(lines) == 3 and "REDIS_URL=redis://" in lines[1] and lines[2] == "./dev demo"
