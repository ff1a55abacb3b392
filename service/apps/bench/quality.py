"""Scenario quality: what the opt-in lossy cold codecs save on disk and what they cost a real model.

For SmolLM2-135M with fp32 and bf16 KV, and each lossy codec (``tiering/lossy``: fp8_e4m3, int8,
int4), over the shipped multi-turn chats (``data/quality_prompts.json``): the history's KV (every turn
but the last) is cut into the store's 16-token blocks, round-tripped through the codec, and the last
user turn is prefilled over it before a greedy continuation (64 tokens; quick 16; tiny 8).

Per (dtype, codec) row:

* ``ratio``: raw KV bytes / bytes on disk (payload + one 40-byte record header per block);
* ``agreement``: share of continuation tokens equal to the exact run's at the same position, and
  ``identical`` (share of chats whose whole continuation is equal), ``first_divergence`` (mean index);
* ``kl``: mean KL(exact ‖ lossy) of the next-token distributions along the exact continuation
  (teacher-forced), ``tf_agreement``: share of those positions where both argmaxes agree;
* ``ppl_exact``, ``ppl``, ``dppl_pct``: perplexity of the second half of each held-out paragraph
  (``data/heldout.txt``) given its first half restored exactly / lossily, and the relative change;
* ``encode_gbps``, ``decode_gbps``: raw bytes / seconds of a pass over the first chat's blocks (best of
  a few passes; one thread; decode into preallocated buffers).

The exact baseline is the same dtype's blocks without the codec (a lossless tier's bytes); a
``lossless`` row gives the store's default lossless codec's ratio beside them. Tiny mode uses the
toy model and random token ids. Results also go to ``quality.png`` (ratio vs agreement and ΔPPL).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from kvtier.service.apps.model import smollm2_gguf_path
from kvtier.tiering import lossy

from kvtier.service.apps.bench import quality_eval as qe
from kvtier.service.apps.bench.context import BenchContext
from kvtier.service.apps.bench.model import conversation, get_model, prefill

CODECS = ("fp8_e4m3", "int8", "int4")
DTYPES = ("float32", "bfloat16")
MAX_PARAGRAPH_TOKENS = 256


def _row(results: dict, codec: str, dtype: str | None, field: str, worst=min) -> tuple[float | None, str]:
    rows = [r for r in results.get("scenarios", {}).get("quality", {}).get("rows", []) or []
            if r["codec"] == codec and (dtype is None or r["dtype"] == dtype)]
    if not rows:
        return None, ""
    r = worst(rows, key=lambda r: r[field])
    return r[field], f"{r['dtype']}, {r['chats']} chats x {r['new_tokens']} tokens"


def _decode_floor(results: dict) -> tuple[float | None, str]:
    rows = [r for r in results.get("scenarios", {}).get("quality", {}).get("rows", []) or [] if r["codec"] in CODECS]
    if not rows:
        return None, ""
    r = min(rows, key=lambda r: r["decode_gbps"])
    return r["decode_gbps"], f"slowest: {r['codec']} {r['dtype']}"


#: Issue 17's targets, in ``targets.TARGETS``' form (id, description, getter, op, threshold, case).
TARGETS: list[tuple[str, str, Callable[[dict], tuple[float | None, str]], str, float, str]] = [
    ("lossy_fp8_fp32_ratio", "fp8_e4m3 on fp32 KV: raw / bytes on disk",
     lambda r: _row(r, "fp8_e4m3", "float32", "ratio"), ">=", 3.5, ""),
    ("lossy_fp8_bf16_ratio", "fp8_e4m3 on bf16 KV: raw / bytes on disk",
     lambda r: _row(r, "fp8_e4m3", "bfloat16", "ratio"), ">=", 1.8, ""),
    ("lossy_fp8_agreement", "fp8_e4m3: greedy-token agreement with exact KV (worse dtype)",
     lambda r: _row(r, "fp8_e4m3", None, "agreement"), ">=", 0.98, "64-token continuations"),
    ("lossy_fp8_dppl_pct", "fp8_e4m3: perplexity change on held-out text, % (worse dtype)",
     lambda r: _row(r, "fp8_e4m3", None, "dppl_pct", worst=max), "<=", 1.0, ""),
    ("lossy_int4_fp32_ratio", "int4 on fp32 KV: raw / bytes on disk",
     lambda r: _row(r, "int4", "float32", "ratio"), ">=", 6.0, ""),
    ("lossy_decode_gbps", "lossy decode GB/s (raw bytes out, one thread), slowest codec and dtype",
     _decode_floor, ">=", 1.0, ""),
]


def _sizes(ctx: BenchContext) -> tuple[int | None, int, int | None]:
    """(chats, new tokens, held-out paragraphs); ``None`` = all shipped."""
    return (2, 8, 1) if ctx.tiny else (2, 16, 1) if ctx.quick else (None, 64, None)


def _tokenizer(ctx: BenchContext):
    if "tokenizer" not in ctx.shared:
        import os

        from transformers import AutoTokenizer

        folder, name = os.path.split(smollm2_gguf_path())
        ctx.shared["tokenizer"] = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return ctx.shared["tokenizer"]


def _inputs(ctx: BenchContext, bm, n_chats: int | None, n_paras: int | None):
    """(chats as ``(ids, history tokens)``, paragraphs as ids) of the run's size."""
    if ctx.tiny:  # the toy model has no tokenizer: seeded random ids of chat-like lengths
        chats = [(conversation(bm, 56, seed=i), 40) for i in range(n_chats)]
        return chats, [conversation(bm, 48, seed=100 + i) for i in range(n_paras)]
    tok = _tokenizer(ctx)
    chats = [qe.chat_split(tok, chat) for chat in qe.load_chats()[:n_chats]]
    paras = [tok(p).input_ids[:MAX_PARAGRAPH_TOKENS] for p in qe.load_heldout()[:n_paras]]
    return chats, paras


def _restores(bm, cache, tallies: qe.Tallies | None) -> tuple[list[tuple[str, str]], list[list[torch.Tensor]]]:
    """Every (dtype, codec) restore of one prefilled history: labels and blocks, exact ones first per dtype."""
    codecs, lossless = {n: lossy.by_name(n) for n in CODECS}, qe.lossless_codec()
    labels, variants = [], []
    for dtype in DTYPES:
        exact = qe.exact_blocks(bm.model, cache, dtype)
        same = qe.round_trip(exact, dtype, lossless, tallies.bytes_for(dtype, "lossless") if tallies else None)
        if not all(torch.equal(a, b) for a, b in zip(same, exact)):
            raise RuntimeError("the lossless codec changed KV bytes")
        labels.append((dtype, "exact"))
        variants.append(exact)
        for name, codec in codecs.items():
            labels.append((dtype, name))
            variants.append(qe.round_trip(exact, dtype, codec, tallies.bytes_for(dtype, name) if tallies else None))
    return labels, variants


def _measure_chats(ctx, bm, chats, new_tokens: int, tallies: qe.Tallies) -> None:
    for i, (ids, h) in enumerate(chats):
        ctx.step(f"chat {i + 1}/{len(chats)} ({h} cached + {len(ids) - h} new tokens)")
        labels, variants = _restores(bm, prefill(bm, ids[:h])[0], tallies)
        generated = qe.greedy_rows(bm.model, ids, variants, new_tokens)
        for dtype in DTYPES:
            rows = [j for j, (d, _) in enumerate(labels) if d == dtype]
            ref = generated[rows[0]]
            lp = qe.tail_log_probs(bm.model, [ids + ref] * len(rows), [variants[j] for j in rows], new_tokens)
            for k, j in enumerate(rows[1:], start=1):
                agree, first = qe.agreement(ref, generated[j])
                tf = float((lp[k].argmax(-1) == torch.tensor(ref)).float().mean())
                tallies.add(dtype, labels[j][1], agreement=agree, identical=float(agree == 1.0),
                            first_divergence=first, kl=qe.kl_mean(lp[0], lp[k]), tf_agreement=tf)


def _measure_perplexity(ctx, bm, paragraphs, tallies: qe.Tallies) -> None:
    for i, ids in enumerate(paragraphs):
        ctx.step(f"held-out paragraph {i + 1}/{len(paragraphs)} ({len(ids)} tokens)")
        half = len(ids) // 2
        labels, variants = _restores(bm, prefill(bm, ids[:half - 1])[0], None)  # ids[:half-1]: predicts ids[half:]
        targets = ids[half:]
        lp = qe.tail_log_probs(bm.model, [ids] * len(variants), variants, len(targets))
        nll = {label: qe.nll_sum(lp[j], targets) for j, label in enumerate(labels)}
        for (dtype, name) in labels:
            if name != "exact":
                tallies.add(dtype, name, nll_exact=nll[(dtype, "exact")], nll=nll[(dtype, name)],
                            ppl_tokens=len(targets))


def _measure_speed(ctx, bm, ids: list[int], h: int) -> dict:
    """(dtype, codec) -> (encode GB/s, decode GB/s) over one history's blocks, best of a few passes."""
    cache = prefill(bm, ids[:h])[0]
    speed = {}
    for dtype in DTYPES:
        blocks = qe.exact_blocks(bm.model, cache, dtype)
        for name in ("lossless", *CODECS):
            ctx.step(f"codec speed {dtype} {name}")
            codec = qe.lossless_codec() if name == "lossless" else lossy.by_name(name)
            speed[(dtype, name)] = qe.codec_speed(blocks, dtype, codec, 2 if ctx.quick else 5)
    return speed


def _rows(tallies: qe.Tallies, speed: dict, chats: int, new_tokens: int) -> list[dict]:
    rows = []
    for dtype in DTYPES:
        for name in ("lossless", *CODECS):
            t = tallies.bytes_for(dtype, name)
            enc, dec = speed[(dtype, name)]
            row = {"dtype": dtype, "codec": name, "ratio": t.raw_bytes / t.disk_bytes, "chats": chats,
                   "new_tokens": new_tokens, "encode_gbps": enc, "decode_gbps": dec}
            q = tallies.quality.get((dtype, name))
            if q is None:  # lossless: the exact bytes by construction (checked in _restores)
                row.update(agreement=1.0, identical=1.0, first_divergence=float(new_tokens), kl=0.0, tf_agreement=1.0,
                           dppl_pct=0.0)
            else:
                row.update({k: statistics.fmean(q[k]) for k in
                            ("agreement", "identical", "first_divergence", "kl", "tf_agreement")})
                n = sum(q["ppl_tokens"])
                ppl_exact, ppl = math.exp(sum(q["nll_exact"]) / n), math.exp(sum(q["nll"]) / n)
                row.update(ppl_exact=ppl_exact, ppl=ppl, dppl_pct=(ppl / ppl_exact - 1) * 100)
            rows.append(row)
    return rows


def _plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, field, label in ((axes[0], "agreement", "greedy-token agreement"), (axes[1], "dppl_pct", "ΔPPL, %")):
        for dtype, marker in zip(DTYPES, "os"):
            sel = [r for r in rows if r["dtype"] == dtype]
            ax.scatter([r["ratio"] for r in sel], [r[field] for r in sel], marker=marker, label=f"{dtype} KV")
            for r in sel:
                ax.annotate(r["codec"], (r["ratio"], r[field]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("raw / bytes on disk (higher is smaller)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("lossy cold codecs: size vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(ctx: BenchContext) -> dict:
    """Rows ``{dtype, codec, ratio, chats, new_tokens, encode_gbps, decode_gbps, agreement, identical,
    first_divergence, kl, tf_agreement, ppl_exact, ppl, dppl_pct}`` and this scenario's ``targets``."""
    n_chats, new_tokens, n_paras = _sizes(ctx)
    bm = get_model(ctx)
    chats, paragraphs = _inputs(ctx, bm, n_chats, n_paras)
    tallies = qe.Tallies()
    threads = torch.get_num_threads()
    # One intra-op thread: on a shared machine two threads fighting other processes made each decode step
    # ~3x slower here. The quality numbers do not depend on it; the codecs are numpy, single-threaded anyway.
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            _measure_chats(ctx, bm, chats, new_tokens, tallies)
            _measure_perplexity(ctx, bm, paragraphs, tallies)
            speed = _measure_speed(ctx, bm, *chats[0])
    finally:
        torch.set_num_threads(threads)
    rows = _rows(tallies, speed, len(chats), new_tokens)
    result = {"rows": rows, "notes": [
        f"{bm.name}: {len(chats)} chats (history restored, last user turn prefilled, {new_tokens} greedy tokens), "
        f"{len(paragraphs)} held-out paragraphs; 16-token blocks; ratio includes a 40-byte record header per block",
        "exact baseline = the same dtype's blocks without the codec; every restore of a history is decoded as "
        "one batch row; codec GB/s: best of a few passes over the first chat's blocks, one thread"]}
    from kvtier.service.apps.bench.targets import evaluate  # targets.py imports this module's TARGETS

    scored = evaluate({"scenarios": {"quality": result}}, TARGETS)
    for t in scored:
        verdict = "not measured" if t["met"] is None else "met" if t["met"] else "MISSED"
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        result["notes"].append(f"target {t['description']}: {value} (goal {t['op']} {t['threshold']:g}) {verdict}"
                               + (f" [{t['measured_at']}]" if t["measured_at"] else ""))
    try:
        _plot(rows, ctx.out / "quality.png")
    except Exception as exc:  # a plot is a convenience: report it, keep the results
        result["notes"].append(f"plot quality: {type(exc).__name__}: {exc}")
    return {**result, "targets": scored}
