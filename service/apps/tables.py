"""What ``kvtier stats`` and ``kvtier inspect`` print: rich tables that fit an 80-column terminal
(tiers as columns, one figure per row; cells fold, never cut to "…"), and the one compression ratio.

Every byte count is shown the same way (binary units, :func:`human_bytes`); counts of things are
plain integers. Imports rich and the generated protobuf types only.
"""

from __future__ import annotations

from rich.table import Table

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb


def human_bytes(n: float) -> str:
    """``1536`` → ``"1.5 KiB"``; whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def compression_ratio(raw_bytes: int, stored_bytes: int) -> float | None:
    """THE compression ratio kvtier reports: raw (decoded) bytes over stored (encoded record) bytes of
    the cold tier; ``None`` when nothing is stored. ``stats`` applies it to the bytes a server wrote,
    ``inspect`` to the records on disk: the same store written once gives the same figure."""
    return raw_bytes / stored_bytes if stored_bytes else None


def ratio_text(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio else "-"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, show_header=bool(columns))
    for i, col in enumerate(columns or ("name", "value")):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    return table


def _value(name: str, value: int) -> str:
    return human_bytes(value) if "bytes" in name else str(value)


def stats_tables(resp: pb.StatsResponse, target: str) -> list[Table]:
    """The per-tier table (tiers as columns) and the store table of one ``StatsResponse``."""
    names = [pb.Tier.Name(t.tier).removeprefix("TIER_").lower() for t in resp.tiers]
    tiers = _table(f"kvtier {resp.version} at {target}", "", *names)

    def row(label: str, cell) -> None:
        tiers.add_row(label, *(cell(t) for t in resp.tiers))

    row("blocks", lambda t: str(t.blocks))
    row("used", lambda t: human_bytes(t.used_bytes))
    row("capacity", lambda t: human_bytes(t.capacity_bytes))
    row("hits", lambda t: str(t.hits))
    row("misses", lambda t: str(t.misses))
    row("hit rate", lambda t: f"{t.hits / (t.hits + t.misses):.1%}" if t.hits + t.misses else "-")
    row("promoted in", lambda t: str(t.promotions))
    row("demoted out", lambda t: str(t.demotions))
    row("evicted", lambda t: str(t.evictions))
    row("bad checksums", lambda t: str(t.checksum_failures))
    store = _table("store")
    store.add_row("pinned blocks", str(resp.pinned_blocks))
    store.add_row("write queue depth", str(resp.write_queue_depth))
    store.add_row("pending writes", str(resp.pending_writes))
    counters = dict(resp.counters)
    ratio = compression_ratio(counters.get("cold_raw_bytes_written", 0), counters.get("cold_record_bytes_written", 0))
    store.add_row("compression ratio", ratio_text(ratio))
    for pair, value in sorted(resp.bytes_moved.items()):
        store.add_row(f"moved {pair.replace('->', ' → ')}", human_bytes(value))
    for codec in sorted(k.removeprefix("codec_raw_bytes_") for k in counters if k.startswith("codec_raw_bytes_")):
        raw, stored = counters.pop(f"codec_raw_bytes_{codec}"), counters.pop(f"codec_stored_bytes_{codec}", 0)
        store.add_row(f"written as {codec}", f"{human_bytes(raw)} → {human_bytes(stored)} "
                      f"({ratio_text(compression_ratio(raw, stored))}, saved {human_bytes(raw - stored)})")
    for name, value in sorted(counters.items()):
        store.add_row(name.replace("_", " "), _value(name, value))
    return [tiers, store]


def inspect_tables(summary: dict) -> list[Table]:
    """The summary table and (when there are any) the namespaces, one row group per namespace."""
    head = _table(f"kvtier data in {summary['data_dir']}")
    head.add_row("blocks", str(summary["blocks"]))
    head.add_row("sessions", str(summary["sessions"]))
    head.add_row("raw bytes", human_bytes(summary["raw_bytes"]))
    head.add_row("stored bytes", human_bytes(summary["stored_bytes"]))
    head.add_row("compression ratio", ratio_text(summary["compression_ratio"]))
    head.add_row("LMDB bytes used", human_bytes(summary["footprint_bytes"]))
    head.add_row("file size", human_bytes(summary["file_bytes"]))
    out = [head]
    if summary["namespaces"]:
        ns_table = _table("namespaces", "tenant / model @ revision", "layout", "blocks", "sessions")
        for ns in summary["namespaces"]:
            ns_table.add_row(f"{ns['tenant']} / {ns['model']} @ {ns['revision']}", ns["layout"], str(ns["blocks"]),
                             str(ns["sessions"]))
        out.append(ns_table)
    return out
