"""Trace loaders: the shipped ServeGen subset and Azure CSVs parse into the documented arrays;
malformed files are reported with file and line."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from shared.traces import (LAW_GAMMA, LAW_NONE, LAW_WEIBULL, TraceError, azure_path, load_azure,
                           load_azure_lengths, load_servegen, load_servegen_client, servegen_clients)


def test_shipped_servegen_subset_has_fourteen_days_per_client():
    clients = servegen_clients()
    assert len(clients) == 44 and 142 in clients
    trace = load_servegen(clients=[142])[142]
    assert len(trace.rate_rps) == 14 * 144
    assert np.all(np.diff(trace.window_start_s) == 600)
    assert set(np.unique(trace.law)) <= {LAW_NONE, LAW_GAMMA, LAW_WEIBULL}
    assert trace.active_fraction >= 0.5 and trace.mean_rate_rps > 0


def test_servegen_plain_and_gzipped_files_parse_alike(tmp_path):
    text = "0,1.5,2.0,Gamma,0.5,1.2\n600,0,0,,0,0\n1200,0.2,1.1,Weibull,0.8,3.0\n"
    (tmp_path / "chunk-7-trace.csv").write_text(text)
    with gzip.open(tmp_path / "chunk-8-trace.csv.gz", "wt") as handle:
        handle.write(text)
    plain, zipped = load_servegen(tmp_path).values()
    assert (plain.client, zipped.client) == (7, 8)
    assert plain.law.tolist() == zipped.law.tolist() == [LAW_GAMMA, LAW_NONE, LAW_WEIBULL]
    assert plain.rate_rps.tolist() == [1.5, 0.0, 0.2] and plain.scale.tolist() == zipped.scale.tolist()


@pytest.mark.parametrize("text,needle", [
    ("0,1.5,2.0,Gamma,0.5\n", "expected 6 columns"),
    ("0,1.5,2.0,Pareto,0.5,1\n", "unknown law"),
    ("0,x,2.0,Gamma,0.5,1\n", "chunk-3-trace.csv:1"),
])
def test_malformed_servegen_rows_are_reported(tmp_path, text, needle):
    path = tmp_path / "chunk-3-trace.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=needle):
        load_servegen_client(path)


def test_azure_traces_parse_with_relative_arrivals():
    conv = load_azure(azure_path("conv"))
    assert len(conv.prompt_tokens) == 19366
    assert conv.arrival_s[0] == 0 and np.all(np.diff(conv.arrival_s) >= 0) and conv.arrival_s[-1] < 2 * 3600
    pooled = load_azure_lengths()
    assert len(pooled.output_tokens) == 19366 + 8819 and pooled.output_tokens.min() > 0


def test_azure_bad_header_and_unknown_kind(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b,c\n")
    with pytest.raises(TraceError, match="unexpected header"):
        load_azure(path)
    with pytest.raises(TraceError, match="unknown Azure trace"):
        azure_path("chat")
