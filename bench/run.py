"""Benchmark Fraisier against Ansible, pyinfra, Fabric and a Paramiko floor on real sshd hosts.

Usage (as root, from the repository root)::

    python bench/run.py [--hosts 1,10,50] [--rounds 5] [--release-hosts 10] [--quick]

The run starts one real sshd per host on 127.0.0.N, installs the peer tools in their own
virtual environments under ``bench/.venvs``, then runs every scenario with every tool, in an
order that rotates each round. It prints medians and ratios and writes the raw figures and
a Markdown summary to ``bench/results/<time>/``. docs/benchmarks.md explains the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lab import BENCH_DIR, Lab, make_source_tree
from report import Measurement, summarize
from tools import TOOLS, Context, Scenario, Tool

log = logging.getLogger("fraisier.bench")

PEER_ORDER = ("fraisier", "ansible", "pyinfra", "fabric", "floor")
RUN_TIMEOUT = 900.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hosts", default="1,10,50", help="host counts of the step scenarios (default 1,10,50)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="runs of each tool per scenario")
    parser.add_argument(
        "--release-hosts", type=int, default=10, help="host count of the release scenario"
    )
    parser.add_argument(
        "--tools", default=",".join(PEER_ORDER), help="tools to run, separated by commas"
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 round on 1 and 10 hosts: a smoke test, not figures"
    )
    parser.add_argument(
        "--no-recording-check",
        action="store_true",
        help="skip the runs of Fraisier without its run database",
    )
    parser.add_argument("--output", type=Path, help="results folder (default bench/results/TIME)")
    args = parser.parse_args(argv)

    if args.quick:
        args.hosts, args.rounds, args.release_hosts = "1,10", 1, min(args.release_hosts, 10)
    args.host_counts = sorted({int(n) for n in args.hosts.split(",") if n.strip()})
    if not args.host_counts or min(args.host_counts) < 1 or max(args.host_counts) > 200:
        parser.error(f"--hosts needs counts between 1 and 200; got {args.hosts!r}")
    if args.rounds < 1:
        parser.error(f"--rounds needs at least 1; got {args.rounds}")

    args.tool_names = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [t for t in args.tool_names if t not in TOOLS]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; choose from {', '.join(PEER_ORDER)}")
    return args


def scenarios_for(args: argparse.Namespace) -> list[Scenario]:
    """Return the scenarios in the order they run: steps on each host count, then the release."""
    scenarios = []
    for count in args.host_counts:
        scenarios.append(Scenario("steps", count, 10))
        scenarios.append(Scenario("steps", count, 1))
    if args.release_hosts > 0:
        scenarios.append(Scenario("release", args.release_hosts))
    return scenarios


def run_once(tool: Tool, scenario: Scenario, ctx: Context, logs: Path, number: int) -> Measurement:
    """Start one tool run, wait for it, and measure wall time, CPU time and peak memory."""
    spec = tool.prepare(scenario, ctx)
    # Python writes and reuses bytecode caches, as it does for an installed package; a shell
    # with PYTHONDONTWRITEBYTECODE set would make Fraisier, run from the checkout, compile every
    # module on every run while the peers load the caches pip wrote.
    spec.env.pop("PYTHONDONTWRITEBYTECODE", None)
    stem = f"{scenario.name}-{tool.name}-{number}"
    stdout_path, stderr_path = logs / f"{stem}.out", logs / f"{stem}.err"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            spec.argv,
            cwd=spec.cwd,
            env=spec.env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        timer = threading.Timer(RUN_TIMEOUT, _kill_group, (process.pid,))
        timer.start()
        try:
            # wait4 returns the CPU time of the tool and of every child process it waited for.
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    try:
        problem = spec.check(
            process.returncode,
            stdout_path.read_text(errors="replace"),
            stderr_path.read_text(errors="replace"),
        )
    except (ValueError, KeyError) as exc:
        problem = f"unreadable output: {exc}"
    finally:
        spec.cleanup()
    if problem:
        log.error("%s on %s failed (%s); see %s", tool.name, scenario.name, problem, stderr_path)
    return Measurement(
        tool=tool.name,
        scenario=scenario.name,
        mode=scenario.mode,
        hosts=scenario.hosts,
        steps=scenario.steps,
        round=number,
        wall=wall,
        cpu_user=usage.ru_utime,
        cpu_system=usage.ru_stime,
        max_rss_kib=usage.ru_maxrss,
        exit_code=process.returncode,
        error=problem,
    )


def _kill_group(pid: int) -> None:
    log.error("run %d exceeded %.0f s; killing its process group", pid, RUN_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def tools_for(scenario: Scenario, names: list[str], args: argparse.Namespace) -> list[str]:
    """Return the tools of a scenario; the largest step scenario also runs Fraisier unrecorded."""
    chosen = list(names)
    largest = scenario.mode == "steps" and scenario.steps == 10
    largest = largest and scenario.hosts == max(args.host_counts)
    if largest and "fraisier" in chosen and not args.no_recording_check:
        chosen.append("fraisier-norecord")
    return chosen


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def machine_facts() -> dict[str, str]:
    """Describe the controller: cores, Python, OpenSSH, kernel."""
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
    return {
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "openssh": ssh.stderr.strip(),
        "kernel": platform.release(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the summary; return 1 when any run failed its check."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        log.error("the benchmark starts sshd and creates deploy users, so it needs root")
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    output = args.output or BENCH_DIR / "results" / stamp
    logs = output / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    tools = {name: TOOLS[name]() for name in [*args.tool_names, "fraisier-norecord"]}
    for tool in tools.values():
        tool.install()
    versions = {name: tool.version() for name, tool in tools.items() if tool.version()}

    load_start = _load()
    workdir = Path(tempfile.mkdtemp(prefix="fraisier-bench-"))
    workdir.chmod(0o711)
    lab = Lab(workdir)
    measurements: list[Measurement] = []
    warmed = False
    try:
        source = make_source_tree(workdir / "source")
        for scenario in scenarios_for(args):
            hosts = lab.hosts(scenario.hosts)
            names = tools_for(scenario, args.tool_names, args)
            if not warmed:
                # One untimed run per tool first: it writes bytecode caches, creates Fraisier's
                # run database and lets each sshd page in its binaries.
                for name in names:
                    ctx = Context(hosts, lab.known_hosts, workdir, source, f"{stamp}-warmup", "")
                    run_once(tools[name], scenario, ctx, logs, -1)
                warmed = True
            for round_number in range(args.rounds):
                shift = round_number % len(names)
                for name in names[shift:] + names[:shift]:
                    ctx = Context(
                        hosts=hosts,
                        known_hosts=lab.known_hosts,
                        workdir=workdir,
                        source=source,
                        release_id=f"{stamp}-{scenario.name}-{name}-{round_number}",
                        run_label=f"{scenario.name} {name} round {round_number + 1}",
                    )
                    result = run_once(tools[name], scenario, ctx, logs, round_number)
                    measurements.append(result)
                    log.info(
                        "%-10s %-18s round %d: %.2f s, cpu %.2f s%s",
                        scenario.name,
                        name,
                        round_number + 1,
                        result.wall,
                        result.cpu_user + result.cpu_system,
                        f", FAILED: {result.error}" if result.error else "",
                    )
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)

    with open(output / "measurements.jsonl", "w") as raw:
        for item in measurements:
            raw.write(json.dumps(dataclasses.asdict(item)) + "\n")
    facts = machine_facts()
    facts["load_start"], facts["load_end"] = load_start, _load()
    meta = {"machine": facts, "versions": versions, "rounds": args.rounds}
    (output / "meta.json").write_text(json.dumps(meta, indent=2))
    summary = summarize(measurements, facts, versions, args.rounds)
    (output / "summary.md").write_text(summary)
    print(summary)
    failed = [m for m in measurements if m.error]
    if failed:
        log.error("%d run(s) failed their check; the figures leave them out", len(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
