"""``kvtier demo``: chat with SmolLM2-135M, park the KV cache after each turn, resume it token-exact.

Runs against ``target`` or, when none is given, a ``kvtier serve`` child process on a temporary port
and data directory (a child process, so the demo can restart it and show a resume from disk). After
the chat, one more user turn is answered several ways and timed: full recompute, the cache that
never left this process, restore from the top memory tier (hot on a GPU server, else warm), and
restore from cold after a server restart. A rich table shows time-to-first-token and whether every variant
produced the same tokens as the recompute. Output is for a person (rich); diagnostics go to logging.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvtier.service.apps import model as lm
from kvtier.service.integrations import hf
from kvtier.service.client.client import KVTierClient

log = logging.getLogger(__name__)

SYSTEM = "You are a friendly assistant who answers briefly and concretely."
QUESTIONS = [
    "I want to start growing vegetables on a small balcony that gets about five hours of sun. What should I plant "
    "first, and what kind of containers and soil do I need?",
    "How often should I water them in summer, and how do I tell if I am overwatering?",
    "Which of those plants can share a container without competing too much?",
    "What pests should I watch for on a balcony, and how do I deal with them without chemicals?",
]
FINAL_QUESTION = "Summarise your advice as a short checklist."


class ServerProcess:
    """A ``python -m kvtier.service serve`` child on 127.0.0.1 with a free port; every wait is bounded.

    :param data_dir: the store directory (kept across :meth:`restart`).
    :param workdir: holds the port file and ``server.log``.
    """

    def __init__(self, data_dir: str, workdir: str, *, start_timeout: float = 60.0) -> None:
        self.data_dir, self.workdir = data_dir, Path(workdir)
        self.port_file = self.workdir / "port"
        self.log_path = self.workdir / "server.log"
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.target: str | None = None

    def start(self) -> str:
        """Start and wait for the port. Returns ``host:port``.

        :raises RuntimeError: if the server exits or does not listen in time (its log tail included).
        """
        self.port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "kvtier.service", "serve", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(self.port_file), "--data-dir", self.data_dir]
        env = {**os.environ, "KVTIER_LOG_LEVEL": os.environ.get("KVTIER_LOG_LEVEL", "WARNING")}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + self.start_timeout
        while time.monotonic() < end:
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text:
                self.target = f"127.0.0.1:{int(text)}"
                return self.target
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"kvtier serve did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the server and wait for it to exit (SIGKILL after ``timeout``)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("kvtier serve ignored signal %s for %.0f s; killing it", sig, timeout)
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> str:
        """Stop gracefully (the write queue is flushed) and start again on the same data directory."""
        self.stop()
        return self.start()


@dataclass(slots=True)
class DemoRow:
    """One way of answering the final turn."""

    how: str
    cached_tokens: int
    prompt_tokens: int
    ttft_s: float
    same_tokens: bool


def _load_model(console: Console):
    with console.status("Loading SmolLM2-135M-Instruct (GGUF, fp32, CPU)…"):
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' own progress bars
            return lm.load_smollm2()


def _first_token_s(model, ids, cache, repeats: int = 3) -> float:
    """Best-of-``repeats`` time to the first token from (a copy of) ``cache``: the shared CPU is noisy."""
    best = float("inf")
    for _ in range(repeats):
        gen = lm.greedy_generate(model, ids, copy.deepcopy(cache) if cache is not None else None, max_new_tokens=1)
        best = min(best, gen.ttft_s)
    return best


def _answer(model, ids, cache, max_new_tokens, eos, restore_s: float = 0.0) -> tuple[float, list[int]]:
    """(TTFT = restore time + best prefill, tokens of a full greedy answer) from ``cache``."""
    ttft = restore_s + _first_token_s(model, ids, cache)
    tokens = lm.greedy_generate(model, ids, cache, max_new_tokens=max_new_tokens, eos_token_id=eos).tokens
    return ttft, tokens


def _timed_restore(model, kv, target, ids, ns, max_new_tokens, eos) -> tuple[int, float, list[int]]:
    t0 = time.perf_counter()
    cache, cached = hf.restore_cache(kv, target, ids, namespace=ns)
    restore_s = time.perf_counter() - t0
    log.info("restore of %d tokens took %.0f ms", cached, restore_s * 1000)
    ttft, tokens = _answer(model, ids, cache, max_new_tokens, eos, restore_s)
    return cached, ttft, tokens


def run_demo(target: str | None = None, data_dir: str | None = None, turns: int = 3, max_new_tokens: int = 24,
             console: Console | None = None) -> list[DemoRow]:
    """Run the demo (module docstring) and return the rows of its timing table.

    :param target: ``host:port`` of a running server; without one a child server is started (and
        restarted for the cold measurement, which is skipped for an external server).
    :param data_dir: store directory of the child server (a temporary one when omitted).
    :raises RuntimeError: if the child server cannot start.
    :raises kvtier.service.client.types.KVTierClientError: if the server cannot be reached.
    """
    console = console or Console()
    with contextlib.ExitStack() as stack:
        server = None
        if target is None:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvtier-demo-"))
            server = ServerProcess(data_dir or os.path.join(work, "data"), work)
            stack.callback(server.stop)
            with console.status("Starting kvtier serve…"):
                target = server.start()
            console.print(f"kvtier serving at [bold]{target}[/bold], data in {server.data_dir}")
        model, tok = _load_model(console)
        eos = tok.eos_token_id
        # the first forward passes of a process are slow (allocator, kernel selection): keep them out of the timings
        lm.greedy_generate(model, lm.chat_ids(tok, [{"role": "user", "content": QUESTIONS[0]}]), max_new_tokens=2)
        ns = hf.namespace_for(model)
        session = f"demo-{uuid.uuid4().hex[:8]}"
        kv = stack.enter_context(KVTierClient(target))
        kv.wait_ready(30)

        messages = [{"role": "system", "content": SYSTEM}]
        for turn in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            ids = lm.chat_ids(tok, messages)
            # the session's chain, its last partial block included, once the first turn parked it
            cache, cached = hf.restore_cache(kv, session if turn else ns, ids, namespace=ns)
            gen = lm.greedy_generate(model, ids, cache, max_new_tokens=max_new_tokens, eos_token_id=eos)
            put = hf.save_cache(kv, ns, session, ids + gen.tokens, gen.cache, durable=turn == turns - 1)
            kept, kept_ids = gen.cache, ids + gen.tokens
            answer = tok.decode(gen.tokens, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": answer})
            console.print(f"[bold cyan]user:[/bold cyan] {messages[-2]['content']}")
            console.print(f"[bold green]assistant:[/bold green] {answer}")
            console.print(f"[dim]  {cached}/{len(ids)} prompt tokens from kvtier, first token after "
                          f"{gen.ttft_s * 1000:.0f} ms; {len(put.stored)} new blocks parked[/dim]")

        messages.append({"role": "user", "content": FINAL_QUESTION})
        ids = lm.chat_ids(tok, messages)
        rows: list[DemoRow] = []
        with console.status("Timing the next turn…"):
            ref_ttft, ref = _answer(model, ids, None, max_new_tokens, eos)
            rows.append(DemoRow("full recompute", 0, len(ids), ref_ttft, True))
            if turns:  # the last turn's cache, never sent anywhere, cut to what the new prompt shares
                same = next((i for i, (a, b) in enumerate(zip(kept_ids, ids)) if a != b), min(len(kept_ids), len(ids)))
                hf.crop_cache(kept, min(same, len(ids) - 1))
                kept_tokens = hf.cache_length(kept)  # the last generated token has no K/V yet
                mem_ttft, mem = _answer(model, ids, kept, max_new_tokens, eos)
                rows.append(DemoRow("cache kept in process memory", kept_tokens, len(ids), mem_ttft, mem == ref))
            tier = "/".join(sorted(set(kv.lookup(ns, ids).tiers))) or "nothing cached"
            cached, ttft, tokens = _timed_restore(model, kv, session if turns else ns, ids, ns, max_new_tokens,
                                                  eos)
            rows.append(DemoRow(f"restore from {tier}", cached, len(ids), ttft, tokens == ref))
            if server is not None:
                kv.close()
                server.restart()
                kv = stack.enter_context(KVTierClient(server.target))
                kv.wait_ready(30)
                tier = "/".join(sorted(set(kv.lookup(ns, ids).tiers))) or "nothing cached"
                cached, ttft, tokens = _timed_restore(model, kv, session, ids, ns, max_new_tokens, eos)
                rows.append(DemoRow(f"restore from {tier} after restart", cached, len(ids), ttft,
                                    tokens == ref))
            else:
                log.info("external server: the restart/cold measurement is skipped")
    _print_table(console, rows, max_new_tokens)
    return rows


def _print_table(console: Console, rows: list[DemoRow], max_new_tokens: int) -> None:
    table = Table(title=f"Next turn: time to first token (restore + best of 3 prefills; {max_new_tokens} greedy "
                         "tokens compared)")
    for col in ("how", "prompt tokens from kvtier", "TTFT", "speed-up", "same tokens as recompute"):
        table.add_column(col, justify="left" if col == "how" else "right")
    base = rows[0].ttft_s
    for r in rows:
        table.add_row(r.how, f"{r.cached_tokens}/{r.prompt_tokens}", f"{r.ttft_s * 1000:.0f} ms",
                      f"{base / r.ttft_s:.1f}x" if r.ttft_s else "-",
                      "[green]yes[/green]" if r.same_tokens else "[red]NO[/red]")
    console.print(table)
