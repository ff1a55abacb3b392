"""``kvtier stats`` and ``inspect`` tables: they fit 80 columns without cutting anything to "…", and
both show the same compression ratio (raw / stored record bytes) for a store written once."""

from __future__ import annotations

import pytest
from rich.console import Console

from kvtier.service.apps.inspect_dir import summarize
from kvtier.service.apps.tables import compression_ratio, inspect_tables, stats_tables
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures.wire import namespace, put_stream, random_blocks, stub, tokens


def render(tables) -> str:
    console = Console(width=80, record=True, color_system=None)
    for table in tables:
        console.print(table)
    return console.export_text()


def test_tables_fit_80_columns_and_agree_on_the_ratio(kvtier_process):
    proc = kvtier_process().start()
    ns = namespace(model="a-rather-long-organisation-name/and-an-even-longer-model-name-v2")
    channel, kv = stub(proc.target)
    with channel:
        kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=tokens(64), block_count=4, session_id="t",
                                       durable=True), random_blocks(ns, 64)), timeout=30)
        stats = kv.Stats(pb.StatsRequest(), timeout=30)
    text = render(stats_tables(stats, proc.target))
    assert "…" not in text and max(map(len, text.splitlines())) <= 80, text
    for head in ("hot", "warm", "cold", "capacity", "evicted", "demoted out"):
        assert head in text
    counters = dict(stats.counters)
    written = compression_ratio(counters["cold_raw_bytes_written"], counters["cold_record_bytes_written"])
    assert f"{written:.2f}x" in text
    assert proc.stop() == 0

    summary = summarize(proc.data_dir)
    assert summary["compression_ratio"] == pytest.approx(written, rel=1e-9)  # same store, same figure
    assert summary["stored_bytes"] < summary["footprint_bytes"]  # LMDB pages are not the ratio's business
    text = render(inspect_tables(summary))
    assert "…" not in text and max(map(len, text.splitlines())) <= 80, text
    assert f"{written:.2f}x" in text and "a-rather-long-organisation-name/and-" in text  # folded, not cut


def test_stats_show_what_each_record_codec_saved():
    stats = pb.StatsResponse(counters={"codec_raw_bytes_fp8_e4m3": 4 << 20, "codec_stored_bytes_fp8_e4m3": 1 << 20,
                                       "codec_raw_bytes_shuffle_zstd": 2 << 20,
                                       "codec_stored_bytes_shuffle_zstd": 3 << 19})
    text = render(stats_tables(stats, "127.0.0.1:1"))
    assert "written as fp8_e4m3" in text and "4.00x" in text and "saved 3.0 MiB" in text, text
    assert "written as shuffle_zstd" in text and "1.33x" in text, text
    assert "codec raw bytes" not in text and max(map(len, text.splitlines())) <= 80, text
