"""Trace files the project never saw: the simulator's own session format and a request CSV, by one command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.scheduler.sim.cli import add_simulate_parser, run_simulate
from services.scheduler.sim.converters import ConversionAssumptions, load_requests, load_sessions
from services.scheduler.sim.trace import TraceError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_session_lines_keep_their_periods_and_fill_in_departure_and_state(tmp_path: Path) -> None:
    trace = load_sessions(write(tmp_path / "s.jsonl", '{"session_id": "a", "active": [[0, 30], [95, 180]]}\n'
                                '{"session_id": "b", "active": [[10, 20]], "departure_s": 50, "state_bytes": 7}\n'))
    a, b = trace.sessions
    assert a.active_periods == ((0.0, 30.0), (95.0, 180.0)) and a.departure_s == 300.0
    assert a.state_bytes == ConversionAssumptions().state_bytes == 4_000_000_000
    assert (b.departure_s, b.state_bytes) == (50.0, 7)
    assert (trace.window_start_s, trace.window_end_s) == (0.0, 180.0)


def test_request_rows_merge_where_they_overlap_and_split_at_a_long_gap(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "session_id,start_s,duration_s,extra\nu,0,30,x\nu,20,30,x\nu,4000,10,x\nv,5,5,x\n")
    trace = load_requests(path)
    periods = sorted(s.active_periods for s in trace.sessions)
    assert periods == [((0.0, 50.0),), ((5.0, 10.0),), ((4000.0, 4010.0),)]


@pytest.mark.parametrize(("name", "text", "where"), [
    ("s.jsonl", '{"session_id": "a", "active": [[0, 30]]}\n{"session_id": "b"}\n', "line 2"),
    ("s.jsonl", '{"session_id": "a", "active": [[30, 0]]}\n', "bad period"),
    ("r.csv", "session_id,start_s,duration_s\nu,0,30\nu,zero,30\n", "line 3"),
    ("r.csv", "session_id,start_s,duration_s\nu,0,-1\n", "line 2"),
    ("r.csv", "session,start_s,duration_s\nu,0,1\n", "line 2"),
])
def test_a_bad_line_is_a_trace_error_that_names_it(tmp_path: Path, name: str, text: str, where: str) -> None:
    loader = load_sessions if name.endswith(".jsonl") else load_requests
    with pytest.raises(TraceError, match=where):
        loader(write(tmp_path / name, text))


def simulate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    return run_simulate(parser.parse_args(["simulate", *argv]))


def test_one_command_runs_a_trace_file_and_reports_first_chunk_and_migration_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps({"session_id": f"s{i}", "active": [[i * 7.0, i * 7.0 + 300.0]]}) for i in range(40)]
    trace = write(tmp_path / "mine.jsonl", "\n".join(lines) + "\n")
    out = tmp_path / "rows.json"
    assert simulate(["--trace", str(trace), "--format", "sessions", "--load", "0", "--policy", "ours",
                     "--policy", "paper", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["policy"] for r in rows] == ["ours", "paper"]
    assert all(r["first_chunk_max_s"] > 0 and "migrated_bytes" in r for r in rows)
    assert "first chunk" in capsys.readouterr().out


def test_a_setting_given_on_the_command_line_reaches_the_policy(tmp_path: Path) -> None:
    """More burst coverage keeps more GPUs warm on the same trace; the default is the chosen setting."""
    lines = [json.dumps({"session_id": f"s{i}", "active": [[i * 3.0, i * 3.0 + 200.0]]}) for i in range(60)]
    trace = write(tmp_path / "clump.jsonl", "\n".join(lines) + "\n")

    def gpu_hours(*setting: str) -> float:
        out = tmp_path / "rows.json"
        extra = [arg for name in setting for arg in ("--setting", name)]
        assert simulate(["--trace", str(trace), "--format", "sessions", "--load", "0", "--policy", "ours",
                         "--json", str(out), *extra]) == 0
        return float(json.loads(out.read_text())[0]["gpu_hours"])

    assert gpu_hours("burst_coverage=0") < gpu_hours() < gpu_hours("burst_coverage=3", "headroom_floor=1")


@pytest.mark.parametrize("setting", ["no_such_setting=1", "burst_coverage=lots", "burst_coverage"])
def test_a_setting_that_is_not_one_or_not_a_number_is_refused_before_anything_runs(
    setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        simulate(["--trace", "synthetic", "--setting", setting])
    assert exit_info.value.code == 2
    assert "--setting" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--trace", "nowhere.jsonl", "--format", "sessions"],
    ["--trace", "mine.jsonl"],
    ["--trace", "synthetic", "--kv-gb", "-1"],
    ["--trace", "synthetic", "--restore-layers", "0"],
    ["--trace", "synthetic", "--load", "4", "--setting", "burst_coverage=-1"],
    ["--trace", "synthetic", "--load", "4", "--setting", "budget_aim=2"],
    ["--trace", "synthetic", "--load", "4", "--setting", "overflow_after_s=-1"],
    ["--trace", "synthetic", "--load", "4", "--rho", "1.5", "--policy", "paper"],
    ["--trace", "synthetic", "--load", "4", "--billing-minimum-s", "-60", "--policy", "paper"],
])
def test_a_bad_trace_or_setting_is_a_one_line_error_with_exit_code_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert simulate(argv) == 2
    assert len(capsys.readouterr().out.strip().splitlines()) <= 2


def test_a_model_config_sizes_each_sessions_state_as_the_model_reports_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.cli import main
    from services.gpu_worker.model.config import get_config
    from services.gpu_worker.model.model_check import ModelSizes

    sizes = ModelSizes.of(get_config("longlive"))
    trace = write(tmp_path / "one.jsonl", '{"session_id": "a", "active": [[0, 60]]}\n')
    assert main(["simulate", "--trace", str(trace), "--format", "sessions", "--policy", "ours",
                 "--model-config", "longlive"]) == 0
    out = capsys.readouterr().out
    assert f"kv_bytes={sizes.kv_bytes}" in out and f"vae_cache_bytes={sizes.vae_cache_bytes}" in out
    assert main(["simulate", "--trace", "synthetic", "--model-config", "no-such-model"]) == 2
