#!/usr/bin/env python3
"""Renders scripts/bench's figures (lines "name value" written by the bench
parts through entrip_metric) as a Markdown report and a JSON file, each
figure next to its ceiling and each target of issues 5, 10, 11 and 15 as met or missed.

Usage: bench/report.py <metrics file> <report prefix> <header line>
Writes <prefix>.md and <prefix>.json; exits 0 even when a target is missed
(the report says so): a benchmark informs, it does not gate.
"""
import json
import sys


def load(path):
    m = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 2:
                continue
            try:
                m[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return m


def fmt(v, unit=""):
    if v is None:
        return "n/a"
    s = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}".rstrip("0").rstrip(".")
    return s + unit


def main():
    path, prefix, header = sys.argv[1], sys.argv[2], sys.argv[3]
    m = load(path)
    g = m.get
    out = [f"# Entrip benchmark report", "", header, ""]
    targets = []

    def target(name, value, limit, ok, detail):
        targets.append({"target": name, "value": value, "limit": limit,
                        "met": bool(ok) if value is not None else None, "detail": detail})

    def ratio(a, b):
        return a / b if a is not None and b else None

    # Ingest
    levels = sorted({int(k.split(".")[1][1:]) for k in m if k.startswith("ingest.c")})
    if levels:
        out += ["## Ingest: POST /v1/bookings (closed loop, unique keys) vs pgbench, same SQL",
                "", "pgbench tps: the service's own statements (bench/booking_tx.sql, simple protocol); "
                "floor tps: only the effect's four rows, `-M prepared` (bench/booking_floor.sql).",
                "", "| concurrency | rps | p50 ms | p95 ms | p99 ms | errors | pgbench tps | ratio | floor tps | ratio |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for c in levels:
            k = f"ingest.c{c}"
            out.append(f"| {c} | {fmt(g(k + '.rps'))} | {fmt(g(k + '.p50_ms'))} | {fmt(g(k + '.p95_ms'))} "
                       f"| {fmt(g(k + '.p99_ms'))} | {fmt(g(k + '.errors'))} | {fmt(g(k + '.pgbench_tps'))} "
                       f"| {fmt(ratio(g(k + '.rps'), g(k + '.pgbench_tps')))} "
                       f"| {fmt(g(k + '.floor_tps'))} | {fmt(ratio(g(k + '.rps'), g(k + '.floor_tps')))} |")
        out.append("")
        r = ratio(g("ingest.c32.rps"), g("ingest.c32.pgbench_tps"))
        target("ingest >= 75 % of pgbench at concurrency 32, no errors", r, 0.75,
               r is not None and r >= 0.75 and g("ingest.c32.errors") == 0,
               f"{fmt(g('ingest.c32.rps'))} rps vs {fmt(g('ingest.c32.pgbench_tps'))} tps, "
               f"{fmt(g('ingest.c32.errors'))} errors")
        r = ratio(g("ingest.c32.rps"), g("ingest.c32.floor_tps"))
        target("ingest >= 0.8x the floor ceiling at concurrency 32 (issue 15)", r, 0.8,
               r is not None and r >= 0.8 and g("ingest.c32.errors") == 0,
               f"{fmt(g('ingest.c32.rps'))} rps vs {fmt(g('ingest.c32.floor_tps'))} tps "
               f"(pgbench -M prepared, the effect's four rows only)")
    if g("ingest.open.rate") is not None:
        out += [f"Open loop at {fmt(g('ingest.open.rate'))}/s (half the sustainable rate, "
                f"{fmt(g('ingest.sustainable.rps'))}/s, the best closed loop's): "
                f"{fmt(g('ingest.open.rps'))} rps, p50 {fmt(g('ingest.open.p50_ms'))} ms, "
                f"p95 {fmt(g('ingest.open.p95_ms'))} ms, p99 {fmt(g('ingest.open.p99_ms'))} ms, "
                f"errors {fmt(g('ingest.open.errors'))}, shed {fmt(g('ingest.open.shed'))} (default settings).", ""]
        p99 = g("ingest.open.p99_ms")
        target("ingest p99 <= 25 ms at half the sustainable rate, no errors, none shed", p99, 25,
               p99 is not None and p99 <= 25 and g("ingest.open.errors") == 0 and not g("ingest.open.shed"),
               f"open loop at {fmt(g('ingest.open.rate'))}/s, {fmt(g('ingest.open.errors'))} errors, "
               f"{fmt(g('ingest.open.shed'))} shed")
    if g("ingest.replay.rps") is not None:
        r = ratio(g("ingest.replay.rps"), g("ingest.c32.rps"))
        out += [f"Replay (same keys again, concurrency 32): {fmt(g('ingest.replay.rps'))} rps, "
                f"p50 {fmt(g('ingest.replay.p50_ms'))} ms, p99 {fmt(g('ingest.replay.p99_ms'))} ms, "
                f"errors {fmt(g('ingest.replay.errors'))}: {fmt(r)}x the create rate.", ""]
        target("replay >= 2x the create rate, no errors", r, 2,
               r is not None and r >= 2 and g("ingest.replay.errors") == 0,
               f"{fmt(g('ingest.replay.rps'))} vs {fmt(g('ingest.c32.rps'))} rps, "
               f"{fmt(g('ingest.replay.errors'))} errors")

    if g("ingest.auth.rps") is not None:
        r = ratio(g("ingest.auth.rps"), g("ingest.noauth.rps"))
        out += [f"Bearer check: {fmt(g('ingest.auth.rps'))} rps authenticated vs {fmt(g('ingest.noauth.rps'))} rps "
                f"with ingest.auth_enabled=false (closed loop, concurrency 32, alternating, 3 rounds each): {fmt(r)}x.", ""]
        target("authenticated create rate >= 0.95x the unauthenticated", r, 0.95, r is not None and r >= 0.95,
               f"{fmt(g('ingest.auth.rps'))} vs {fmt(g('ingest.noauth.rps'))} rps")
    # The HTTP create rate that overload and AMQP ingest are held against.
    sus = g("ingest.sustainable.rps") or g("ingest.c32.rps")
    if g("ingest.overload.rps") is not None:
        good = ratio(g("ingest.overload.rps"), sus)
        p99r = ratio(g("ingest.overload.p99_ms"), g("ingest.open.p99_ms"))
        out += [f"Overload, open loop offering {fmt(g('ingest.overload.rate'))}/s (4x the sustainable rate): "
                f"goodput {fmt(g('ingest.overload.rps'))}/s ({fmt(good)}x), accepted p50 {fmt(g('ingest.overload.p50_ms'))} ms, "
                f"p99 {fmt(g('ingest.overload.p99_ms'))} ms ({fmt(p99r)}x the half-load p99), "
                f"{fmt(g('ingest.overload.shed'))} shed answers with p99 {fmt(g('ingest.overload.shed_p99_ms'))} ms, "
                f"errors {fmt(g('ingest.overload.errors'))}.", ""]
        if g("ingest.overload.final_limit") is not None:
            out += [f"Default settings (the adaptive in-flight limit, at most 64); the limit was "
                    f"{fmt(g('ingest.overload.final_limit'))} at the end.", ""]
        if g("ingest.overload_fixed.rps") is not None:
            out += [f"The same overload with the limit fixed at 64 (ingest.adaptive_in_flight=false; not a target): "
                    f"goodput {fmt(g('ingest.overload_fixed.rps'))}/s "
                    f"({fmt(ratio(g('ingest.overload_fixed.rps'), sus))}x), accepted p99 "
                    f"{fmt(g('ingest.overload_fixed.p99_ms'))} ms "
                    f"({fmt(ratio(g('ingest.overload_fixed.p99_ms'), g('ingest.open.p99_ms')))}x the half-load p99), "
                    f"shed p99 {fmt(g('ingest.overload_fixed.shed_p99_ms'))} ms.", ""]
        target("overload: goodput >= 0.9x the sustainable rate", good, 0.9, good is not None and good >= 0.9,
               f"{fmt(g('ingest.overload.rps'))} vs {fmt(sus)}/s, the best closed loop; "
               f"{fmt(ratio(g('ingest.overload.rps'), g('ingest.c32.rps')))}x the concurrency-32 rate")
        target("overload: accepted p99 <= 2x the half-load p99", p99r, 2, p99r is not None and p99r <= 2,
               f"{fmt(g('ingest.overload.p99_ms'))} vs {fmt(g('ingest.open.p99_ms'))} ms")
        sp = g("ingest.overload.shed_p99_ms")
        target("overload: shed answers p99 <= 5 ms", sp, 5, sp is not None and sp <= 5 and g("ingest.overload.shed"),
               f"{fmt(g('ingest.overload.shed'))} shed")
        rss_i = g("rss_kb.ingest")
        target("overload: ingest peak RSS <= 100 MB", rss_i / 1024 if rss_i else None, 100,
               rss_i is not None and rss_i / 1024 <= 100, "VmHWM over the whole ingest run")

    # AMQP ingest (issue 11), against the HTTP create rate of the same run.
    if g("ingest.amqp.oneway.rps") is not None:
        off, on = g("ingest.amqp.oneway.rps"), g("ingest.amqp.replies.rps")
        out += ["## AMQP ingest: requests published to entrip.ingest (ingest/examples/amqp_load.rs)", "",
                "| what | requests/s | of the HTTP create rate |", "|---|---|---|",
                f"| HTTP create rate (the best closed loop) | {fmt(sus)} | 1 |",
                f"| replies off (10,000 published at once, until stored) | {fmt(off)} | {fmt(ratio(off, sus))} |",
                f"| replies on (a window of 64 awaiting replies; errors {fmt(g('ingest.amqp.replies.errors'))}) "
                f"| {fmt(on)} | {fmt(ratio(on, sus))} |",
                f"| pgbench, the service's statements, concurrency 8 (ingest.amqp.concurrency) "
                f"| {fmt(g('ingest.c8.pgbench_tps'))} | {fmt(ratio(g('ingest.c8.pgbench_tps'), sus))} |", ""]
        for name, v in (("replies off", off), ("replies on", on)):
            r = ratio(v, sus)
            target(f"AMQP ingest, {name}, >= 0.9x the HTTP create rate (issue 11)", r, 0.9,
                   r is not None and r >= 0.9, f"{fmt(v)} vs {fmt(sus)}/s")
    if g("ingest.amqp.open.p99_ms") is not None:
        out += [f"AMQP open loop at {fmt(g('ingest.amqp.open.rate'))}/s (half the replies-on rate): publish to "
                f"reply p50 {fmt(g('ingest.amqp.open.p50_ms'))} ms, p95 {fmt(g('ingest.amqp.open.p95_ms'))} ms, "
                f"p99 {fmt(g('ingest.amqp.open.p99_ms'))} ms, errors {fmt(g('ingest.amqp.open.errors'))}.", ""]
        p99 = g("ingest.amqp.open.p99_ms")
        target("AMQP publish -> reply p99 <= 25 ms at half the replies-on rate, no errors (issue 11)", p99, 25,
               p99 is not None and p99 <= 25 and g("ingest.amqp.open.errors") == 0,
               f"open loop at {fmt(g('ingest.amqp.open.rate'))}/s")

    # Relay
    if g("relay.raw_rps") is not None:
        # The ceiling: the better of one and two publishing channels (a
        # dispatcher publishes on one channel per lane).
        raw = max(g("relay.raw_rps"), g("relay.raw2_rps") or 0)
        out += ["## Relay: draining a backlog of 100,000 outbox rows, publisher confirms", "",
                f"Message bodies of {fmt(g('relay.bytes'))} bytes. The ceiling is the better of the two raw runs.", "",
                "| what | events/s | of the ceiling |", "|---|---|---|",
                f"| raw publish with confirms, one channel | {fmt(g('relay.raw_rps'))} | {fmt(ratio(g('relay.raw_rps'), raw))} |",
                f"| raw publish with confirms, two channels at once | {fmt(g('relay.raw2_rps'))} | {fmt(ratio(g('relay.raw2_rps'), raw))} |",
                f"| relay, 1 dispatcher | {fmt(g('relay.one_rps'))} | {fmt(ratio(g('relay.one_rps'), raw))} |",
                f"| relay, 3 dispatchers | {fmt(g('relay.three_rps'))} | {fmt(ratio(g('relay.three_rps'), raw))} |", ""]
        out += [f"Relaying timed from 1 s after the first publish to the last (the raw runs time only their "
                f"publishing too). From the processes' start to the drained outbox: 1 dispatcher "
                f"{fmt(g('relay.one_wall_rps'))}/s, 3 dispatchers {fmt(g('relay.three_wall_rps'))}/s.", ""]
        r = ratio(g("relay.one_rps"), raw)
        target("relay, 1 dispatcher >= 0.8x the raw ceiling (issue 15)", r, 0.8, r is not None and r >= 0.8,
               f"{fmt(g('relay.one_rps'))} vs {fmt(raw)} msg/s")
        three, one = g("relay.three_rps"), g("relay.one_rps")
        target("relay, 3 dispatchers >= 1 (issue 15)", ratio(three, one), 1,
               three is not None and one is not None and three >= one, f"{fmt(three)} vs {fmt(one)} events/s")
    if g("relay.steady.p99_ms") is not None:
        out += [f"Commit -> published with only the relay running, {fmt(g('relay.steady.rate'))} rows/s "
                f"(pgbench inserting outbox rows): p50 {fmt(g('relay.steady.p50_ms'))} ms, "
                f"p99 {fmt(g('relay.steady.p99_ms'))} ms, max {fmt(g('relay.steady.max_ms'))} ms.", ""]
        p99 = g("relay.steady.p99_ms")
        target("commit -> published p99 <= 25 ms at 500/s (relay alone; issue 15)", p99, 25,
               p99 is not None and p99 <= 25, "pgbench -R 500 inserting outbox rows")

    # Relay on a 3-node cluster (scripts/bench-cluster): measured, no target
    if g("cluster.raw_rps") is not None:
        out += ["## Relay on a 3-node RabbitMQ cluster (quorum queues of 3)", "",
                "| what | figure |", "|---|---|",
                f"| raw publish with confirms through node 1 | {fmt(g('cluster.raw_rps'))} msg/s |",
                f"| relay, 1 dispatcher, all three nodes in AMQP_URL | {fmt(g('cluster.one_rps'))} events/s "
                f"({fmt(ratio(g('cluster.one_rps'), g('cluster.raw_rps')))} of raw) |",
                f"| failover window: last confirm before the SIGKILL of the dispatcher's node -> first on another | {fmt(g('cluster.failover_ms'))} ms |",
                f"| commit -> published at 500/s, rows outside the window: p50 / p99 | {fmt(g('cluster.steady.p50_ms'))} / {fmt(g('cluster.steady.p99_ms'))} ms |",
                f"| commit -> published, all rows: p99 / max | {fmt(g('cluster.steady.all_p99_ms'))} / {fmt(g('cluster.steady.max_ms'))} ms |",
                ""]

    # Workers and end to end
    if g("workers.backlog_rps") is not None:
        out += ["## Workers and the fleet end to end", "",
                f"Settlement consumer draining a backlog of payment.approved: {fmt(g('workers.backlog_rps'))} messages/s.", ""]
    rates = sorted({int(k.split(".")[1][1:]) for k in m if k.startswith("e2e.r")})
    if rates:
        out += ["Journeys (booking, payment, APPROVED result) offered at a steady rate, all three services running:", "",
                "| offered /s | offered | completed within the window /s | failed | shed | commit->published p50 / p99 ms | payment result->settlement p50 / p99 ms |",
                "|---|---|---|---|---|---|---|"]
        for r in rates:
            k = f"e2e.r{r}"
            out.append(f"| {r} | {fmt(g(k + '.offered'))} | {fmt(g(k + '.completed_rps'))} | {fmt(g(k + '.failed'))} "
                       f"| {fmt(g(k + '.shed'))} | {fmt(g(k + '.published_p50_ms'))} / {fmt(g(k + '.published_p99_ms'))} "
                       f"| {fmt(g(k + '.settled_p50_ms'))} / {fmt(g(k + '.settled_p99_ms'))} |")
        out.append("")
        if 500 in rates:
            p99 = g("e2e.r500.published_p99_ms")
            target("commit -> published p99 <= 50 ms at 500 bookings/s offered (whole fleet)", p99, 50,
                   p99 is not None and p99 <= 50,
                   f"{fmt(g('e2e.r500.completed_rps'))} journeys/s completed of 500 offered")

    # Capacity without collapse (issue 15)
    multiples = sorted({float(k.split(".")[1][1:]) for k in m if k.startswith("e2e.x")})
    if g("e2e.capacity_rps") is not None:
        out += [f"Capacity: {fmt(g('e2e.capacity_rps'))} journeys/s completed by 32 clients back to back. "
                "Journeys offered at multiples of it; the client retries a 503 after its Retry-After "
                "(same Idempotency-Key) and counts the retries apart:", "",
                "| offered | /s | completed within the window /s | failed | shed by the client | refused (503) | refusal p50 / p99 ms | retries | journey p50 / p99 ms | payment result->settlement p50 / p99 ms |",
                "|---|---|---|---|---|---|---|---|---|---|"]

        def key(x):
            return f"e2e.x{x:g}"
        for x in multiples:
            k = key(x)
            out.append(f"| {x:g}x | {fmt(g(k + '.rate'))} | {fmt(g(k + '.completed_rps'))} | {fmt(g(k + '.failed'))} "
                       f"| {fmt(g(k + '.shed'))} | {fmt(g(k + '.refused'))} "
                       f"| {fmt(g(k + '.refusal_p50_ms'))} / {fmt(g(k + '.refusal_p99_ms'))} | {fmt(g(k + '.retries'))} "
                       f"| {fmt(g(k + '.journey_p50_ms'))} / {fmt(g(k + '.journey_p99_ms'))} "
                       f"| {fmt(g(k + '.settled_p50_ms'))} / {fmt(g(k + '.settled_p99_ms'))} |")
        out.append("")
        base_rps, base_p99 = g("e2e.x1.completed_rps"), g("e2e.x1.settled_p99_ms")
        for x in (2.0, 4.0):
            if x not in multiples:
                continue
            k = key(x)
            r = ratio(g(k + ".completed_rps"), base_rps)
            target(f"journeys completed at {x:g}x capacity >= 0.9x the 1x rate", r, 0.9,
                   r is not None and r >= 0.9,
                   f"{fmt(g(k + '.completed_rps'))}/s against {fmt(base_rps)}/s at 1x")
            p = ratio(g(k + ".settled_p99_ms"), base_p99)
            target(f"payment result -> settlement p99 at {x:g}x capacity <= 2x its 1x value", p, 2,
                   p is not None and p <= 2,
                   f"{fmt(g(k + '.settled_p99_ms'))} ms against {fmt(base_p99)} ms at 1x")

    # Memory
    rss = {k: v for k, v in m.items() if k.startswith("rss_kb.")}
    unknown_rss = [k for k, v in rss.items() if v <= 0]
    if rss:
        out += ["## Peak resident memory (VmHWM)", "", "| process | MB |", "|---|---|"]
        for k, v in sorted(rss.items()):
            out.append(f"| {k[len('rss_kb.'):]} | {v / 1024:.1f} |")
        out.append("")
        peak = max(rss.values()) / 1024
        target("each service <= 100 MB RSS", peak, 100, peak <= 100 and not unknown_rss,
               f"largest: {peak:.1f} MB" + (f"; not read (process gone): {', '.join(unknown_rss)}" if unknown_rss else ""))

    out += ["## Targets (issues 5, 10, 11 and 15)", "", "| target | value | limit | met |", "|---|---|---|---|"]
    for t in targets:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        out.append(f"| {t['target']} | {fmt(t['value'])} ({t['detail']}) | {fmt(t['limit'])} | {met} |")
    out.append("")
    with open(prefix + ".md", "w") as f:
        f.write("\n".join(out))
    with open(prefix + ".json", "w") as f:
        json.dump({"header": header, "metrics": m, "targets": targets}, f, indent=2, sort_keys=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
