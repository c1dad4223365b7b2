"""The `warmserve` command as a new user meets it: group help at every level, every command reaching
its module with the words after the first, concise per-command help, a status table that fits long
ids, rounded figures in `watch`, banner commands that run as printed."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from shared.schemas import Event
from warmserve import cli, status, watch


@pytest.fixture
def calls(monkeypatch):
    """Every command's module replaced by one recording the argv it gets."""
    seen: list[tuple[str, list[str]]] = []
    modules = {module: SimpleNamespace(main=lambda argv, m=module: seen.append((m, argv)) or 0)
               for module, _ in cli.COMMANDS.values()}
    monkeypatch.setattr(cli.importlib, "import_module", modules.__getitem__)
    return seen


@pytest.mark.parametrize("group,commands", [("models", ["build-demo", "list"]), ("bench", ["chaos", "fuzz"]),
                                            ("sim", ["run", "sweep"]), ("forecast", ["backtest"])])
def test_group_help_lists_the_group_and_exits_0(group, commands, capsys):
    for argv in ([group, "--help"], [group, "-h"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert f"Usage: warmserve {group}" in out and all(f"  {c} " in out for c in commands)


def test_the_installed_entry_point_gives_group_help():
    result = subprocess.run([sys.executable, "-m", "warmserve.cli", "models", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "build-demo" in result.stdout


def test_every_command_gets_its_words_after_the_first_and_its_options(calls):
    for words, (module, _) in cli.COMMANDS.items():
        group = any(len(w) > len(words) and w[:len(words)] == words for w in cli.COMMANDS)
        assert cli.main([*words, *([cli.RUN] if group else []), "--x", "-h", "--", "y"]) == 0  # `sim -h`: group help
        assert calls[-1] == (module, [*words[1:], "--x", "-h", "--", "y"])
    assert cli.main(["sim", "run", "--config", "c"]) == 0 and calls[-1] == ("sim.cli", ["--config", "c"])
    assert cli.main(["sim"]) == 0 and calls[-1] == ("sim.cli", [])


def test_a_mistyped_command_gets_a_suggestion(capsys):
    assert cli.main(["stauts"]) == 2
    assert "Did you mean 'status'" in capsys.readouterr().err


def help_of(argv: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "warmserve.cli", *argv, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_help_lists_the_settings_that_apply():
    shown = help_of(["status"])
    assert "--redis-url" in shown and "--placer-tick-s" not in shown and len(shown.splitlines()) < 60
    placer = help_of(["service", "placer"])
    assert "--placer-tick-s" in placer and "--gateway-port" not in placer and "placer settings" in placer
    assert "--devices" in help_of(["up"])


def test_status_table_fits_long_ids():
    long_id = "demo-small-a-" + "0123456789abcdef" * 3
    snap = {"models": ["demo-small-a", "m"], "instances": [
                {"instance_id": long_id, "model": "demo-small-a", "node": "n", "devices": [0], "state": "ready",
                 "inflight": 3},
                {"instance_id": "i2", "model": "m", "node": "a-rather-long-node-name", "devices": [1],
                 "state": "starting", "inflight": 0}],
            "devices": [{"node": "a-rather-long-node-name", "device": 1, "free_bytes": 1 << 30,
                         "idle_engine_bytes": 0, "models": {"m": "starting", "demo-small-a": "ready"}}]}
    lines = status.render(snap).splitlines()
    table = lines[lines.index("") + 1:]
    assert table[1].startswith(long_id + "  ")
    for column in ("model", "node/dev", "state"):  # each column starts where its header does
        start = table[0].index(column)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in table[1:])
    assert lines[2].split() == ["a-rather-long-node-name/1", "1024", "0", "P", "s"]

    snap["models"] = ["m", "meta-llama/Llama-3.1-8B-Instruct"]  # too long for a header: numbered, with a legend
    text = status.render(snap)
    assert "#2" in text.splitlines()[1] and "  #2 meta-llama/Llama-3.1-8B-Instruct" in text


def test_watch_rounds_figures():
    event = Event(name="instance_ready", at_s=0.0, model="m", detail={"engine_init_ms": 5502.803695000011,
                                                                       "promote_ms": 3.14159, "share": 0.012345})
    line = watch.render("s", event, as_json=False)
    assert "engine_init_ms=5503 promote_ms=3.1 share=0.0123" in line


def test_banner_commands_name_this_environments_warmserve(monkeypatch, tmp_path):
    from shared.settings import load_settings
    from warmserve.up import Stack

    monkeypatch.chdir(tmp_path)
    flags = {"data_dir": str(tmp_path / "var"), "gateway_port": 8001}
    banner = Stack(load_settings(flags, env={}), flags).banner()
    assert f"{cli.invocation()} status --data-dir {tmp_path / 'var'}" in banner
    monkeypatch.setenv("PATH", str(tmp_path))  # not on PATH: the script's own path
    script = cli.Path(sys.executable).parent / "warmserve"
    assert cli.invocation() in (str(script), f"{sys.executable} -m warmserve.cli")
