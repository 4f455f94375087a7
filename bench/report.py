"""The benchmark's figures: medians, ratios, per-step overhead, CPU and memory, and targets."""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Iterable

# Targets of the step scenarios on the largest host count, checked by ``targets()``.
MAX_OVERHEAD_VS_FLOOR = 3.0
MAX_WALL_VS_FLOOR = 1.5
MIN_SPEEDUP_VS_PYINFRA = 5.0
MIN_SPEEDUP_VS_ANSIBLE = 20.0
MAX_SCALING = 3.0
MAX_RECORDING_COST = 0.10


@dataclasses.dataclass
class Measurement:
    """One run of one tool on one scenario."""

    tool: str
    scenario: str
    mode: str
    hosts: int
    steps: int
    round: int
    wall: float  # seconds, from start to exit of the tool's process
    cpu_user: float  # seconds, the tool's process and the children it waited for
    cpu_system: float
    max_rss_kib: int  # peak resident memory of the largest of those processes
    exit_code: int
    error: str | None = None

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_system


class Figures:
    """Medians of the successful runs, by scenario and tool."""

    def __init__(self, measurements: Iterable[Measurement]) -> None:
        self.runs: dict[tuple[str, str], list[Measurement]] = {}
        self.failed: dict[tuple[str, str], int] = {}
        for item in measurements:
            key = (item.scenario, item.tool)
            if item.error:
                self.failed[key] = self.failed.get(key, 0) + 1
            else:
                self.runs.setdefault(key, []).append(item)

    def wall(self, scenario: str, tool: str) -> float | None:
        runs = self.runs.get((scenario, tool))
        return statistics.median(m.wall for m in runs) if runs else None

    def cpu(self, scenario: str, tool: str) -> float | None:
        runs = self.runs.get((scenario, tool))
        return statistics.median(m.cpu for m in runs) if runs else None

    def rss_mib(self, scenario: str, tool: str) -> float | None:
        runs = self.runs.get((scenario, tool))
        return max(m.max_rss_kib for m in runs) / 1024 if runs else None

    def tools(self, scenario: str) -> list[str]:
        keys = set(self.runs) | set(self.failed)
        return [tool for name, tool in sorted(keys, key=_tool_order) if name == scenario]

    def fastest(self, scenario: str, tool: str) -> float | None:
        runs = self.runs.get((scenario, tool))
        return min(m.wall for m in runs) if runs else None

    def cpu_per_host_step(self, hosts: int, tool: str) -> float | None:
        """Return the CPU seconds each host-step adds: (CPU(10 steps) - CPU(1 step)) / 9 / hosts.

        CPU time moves much less with the machine's other load than wall time does.
        """
        ten = self.cpu(f"steps10-n{hosts}", tool)
        one = self.cpu(f"steps1-n{hosts}", tool)
        return None if ten is None or one is None else (ten - one) / 9 / hosts

    def overhead(self, hosts: int, tool: str, pick: str = "median") -> float | None:
        """Return the seconds each step adds: (wall(10 steps) - wall(1 step)) / 9.

        ``pick`` is "median" or "min": the fastest runs are the least disturbed by other load.
        """
        figure = self.wall if pick == "median" else self.fastest
        ten = figure(f"steps10-n{hosts}", tool)
        one = figure(f"steps1-n{hosts}", tool)
        return None if ten is None or one is None else (ten - one) / 9


def _tool_order(key: tuple[str, str]) -> tuple[str, int]:
    order = ["fraisier", "fraisier-norecord", "ansible", "pyinfra", "fabric", "floor"]
    tool = key[1]
    return key[0], order.index(tool) if tool in order else len(order)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def _num(value: float | None, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value * scale:.{digits}f}{unit}"


def scenario_table(figures: Figures, scenario: str) -> list[str]:
    lines = [
        f"### {scenario}",
        "",
        "| tool | runs ok | median wall | min | max | vs Fraisier | vs floor | median CPU | peak RSS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = figures.wall(scenario, "fraisier")
    floor = figures.wall(scenario, "floor")
    for tool in figures.tools(scenario):
        runs = figures.runs.get((scenario, tool), [])
        failed = figures.failed.get((scenario, tool), 0)
        wall = figures.wall(scenario, tool)
        walls = [m.wall for m in runs]
        lines.append(
            f"| {tool} | {len(runs)}/{len(runs) + failed} | {_num(wall, ' s')} "
            f"| {_num(min(walls) if walls else None, ' s')} "
            f"| {_num(max(walls) if walls else None, ' s')} "
            f"| {_ratio(wall, base)} | {_ratio(wall, floor)} "
            f"| {_num(figures.cpu(scenario, tool), ' s')} "
            f"| {_num(figures.rss_mib(scenario, tool), ' MiB', digits=0)} |"
        )
    return [*lines, ""]


def overhead_table(figures: Figures, host_counts: list[int]) -> list[str]:
    lines = [
        "### Per-step overhead: (median wall of 10 steps - median wall of 1 step) / 9",
        "",
        "| hosts | tool | ms per step (medians) | vs floor | ms per step (fastest runs) | vs floor "
        "| tool CPU ms per host-step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for hosts in host_counts:
        floor = figures.overhead(hosts, "floor")
        floor_min = figures.overhead(hosts, "floor", "min")
        for tool in figures.tools(f"steps10-n{hosts}"):
            value = figures.overhead(hosts, tool)
            fastest = figures.overhead(hosts, tool, "min")
            if value is None:
                continue
            lines.append(
                f"| {hosts} | {tool} | {value * 1000:.1f} | {_ratio(value, floor)} "
                f"| {_num(fastest, '', 1000, 1)} | {_ratio(fastest, floor_min)} "
                f"| {_num(figures.cpu_per_host_step(hosts, tool), '', 1000, 2)} |"
            )
    return [*lines, ""]


def fraisier_table(figures: Figures, host_counts: list[int]) -> list[str]:
    lines = [
        "### Fraisier controller cost (10 steps)",
        "",
        "| hosts | median wall | median CPU (user+sys) | CPU per host-step | added CPU per "
        "host-step | peak RSS | added RSS per host |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    # "Added" figures compare with the smallest host count, so start-up costs cancel out.
    base_hosts = min(host_counts)
    base_cpu = figures.cpu(f"steps10-n{base_hosts}", "fraisier")
    base_rss = figures.rss_mib(f"steps10-n{base_hosts}", "fraisier")
    for hosts in host_counts:
        scenario = f"steps10-n{hosts}"
        cpu = figures.cpu(scenario, "fraisier")
        rss = figures.rss_mib(scenario, "fraisier")
        per = None if cpu is None else cpu / (hosts * 10)
        added = added_rss = None
        if hosts > base_hosts and cpu is not None and base_cpu is not None:
            added = (cpu - base_cpu) / ((hosts - base_hosts) * 10)
        if hosts > base_hosts and rss is not None and base_rss is not None:
            added_rss = (rss - base_rss) / (hosts - base_hosts)
        lines.append(
            f"| {hosts} | {_num(figures.wall(scenario, 'fraisier'), ' s')} | {_num(cpu, ' s')} "
            f"| {_num(per, ' ms', 1000, 1)} | {_num(added, ' ms', 1000, 2)} "
            f"| {_num(rss, ' MiB', digits=0)} | {_num(added_rss, ' MiB', digits=2)} |"
        )
    return [*lines, ""]


def targets(figures: Figures, host_counts: list[int]) -> list[str]:
    """Return one line per target: met or missed, with the measured value."""
    largest, smallest = max(host_counts), min(host_counts)
    big = f"steps10-n{largest}"
    lines = ["### Targets", ""]

    def verdict(name: str, ok: bool | None, measured: str) -> None:
        state = "met" if ok else "MISSED"
        if ok is None:
            state = "n/a"
        lines.append(f"- {name}: **{state}** ({measured})")

    for hosts in host_counts:
        mine, floor = figures.overhead(hosts, "fraisier"), figures.overhead(hosts, "floor")
        ratio = mine / floor if mine is not None and floor and floor > 0 else None
        verdict(
            f"per-step overhead on {hosts} host(s) within {MAX_OVERHEAD_VS_FLOOR:g}x the floor's",
            None if ratio is None else ratio <= MAX_OVERHEAD_VS_FLOOR,
            f"{_num(mine, ' ms', 1000, 1)} vs {_num(floor, ' ms', 1000, 1)}",
        )
    mine, floor = figures.wall(big, "fraisier"), figures.wall(big, "floor")
    verdict(
        f"10 steps on {largest} hosts within {MAX_WALL_VS_FLOOR:g}x the floor's wall time",
        None if mine is None or not floor else mine / floor <= MAX_WALL_VS_FLOOR,
        f"{_ratio(mine, floor)}",
    )
    for peer, minimum in (("pyinfra", MIN_SPEEDUP_VS_PYINFRA), ("ansible", MIN_SPEEDUP_VS_ANSIBLE)):
        theirs = figures.wall(big, peer)
        verdict(
            f"10 steps on {largest} hosts at least {minimum:g}x faster than {peer}",
            None if mine is None or theirs is None else theirs / mine >= minimum,
            f"{_ratio(theirs, mine)} faster",
        )
    small = figures.wall(f"steps10-n{smallest}", "fraisier")
    verdict(
        f"{largest} hosts no more than {MAX_SCALING:g}x the wall time of {smallest}",
        None if mine is None or not small or largest == smallest else mine / small <= MAX_SCALING,
        f"{_ratio(mine, small)}",
    )
    unrecorded = figures.wall(big, "fraisier-norecord")
    cost = None if mine is None or not unrecorded else mine / unrecorded - 1
    verdict(
        f"recording in SQLite adds under {MAX_RECORDING_COST:.0%} to {largest} hosts",
        None if cost is None else cost < MAX_RECORDING_COST,
        f"{_num(mine, ' s')} recorded vs {_num(unrecorded, ' s')} unrecorded: "
        f"{_num(cost, '%', 100, 1)}",
    )
    return [*lines, ""]


def summarize(
    measurements: list[Measurement], machine: dict[str, str], versions: dict[str, str], rounds: int
) -> str:
    """Return the Markdown summary of a benchmark run."""
    figures = Figures(measurements)
    host_counts = sorted({m.hosts for m in measurements if m.mode == "steps"})
    lines = [
        "## Benchmark results",
        "",
        f"Machine: {machine['cores']} cores, Python {machine['python']}, {machine['openssh']}, "
        f"Linux {machine['kernel']}; every host is a real sshd on 127.0.0.N. {rounds} round(s) "
        "per tool and scenario, in an order that rotates each round. Load average "
        f"{machine.get('load_start', '?')} at the start, {machine.get('load_end', '?')} at the end.",
        "",
    ]
    if versions:
        lines += [
            "Peers: " + "; ".join(f"{name}: {text}" for name, text in versions.items()),
            "",
        ]
    scenarios = sorted({m.scenario for m in measurements}, key=_scenario_order)
    for scenario in scenarios:
        lines += scenario_table(figures, scenario)
    if host_counts:
        lines += overhead_table(figures, host_counts)
        lines += fraisier_table(figures, host_counts)
        lines += targets(figures, host_counts)
    return "\n".join(lines)


def _scenario_order(name: str) -> tuple[int, int, int]:
    work, _, hosts = name.partition("-n")
    if work.startswith("steps"):
        return 0, int(hosts), -int(work[5:])
    return 1, int(hosts), 0


def main(argv: list[str]) -> int:
    """Print the summary of a results folder written by ``bench/run.py``."""
    import json
    from pathlib import Path

    if len(argv) != 1:
        print("usage: python bench/report.py RESULTS_FOLDER", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    lines = (folder / "measurements.jsonl").read_text().splitlines()
    measurements = [Measurement(**json.loads(line)) for line in lines if line.strip()]
    meta = json.loads((folder / "meta.json").read_text())
    print(summarize(measurements, meta["machine"], meta["versions"], meta["rounds"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
