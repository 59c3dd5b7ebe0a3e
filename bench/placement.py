"""Placements per second of PINK's queue planner (pure logic, no services).

1,000 simulated runners with 8 GPUs each and 10,000 waiting tasks from 50
users with mixed GPU counts: one `placement.plan` pass over the whole queue,
as every transfer job runs it. Nomad's two-million-container run placed
about 1,500 per second; the target is 2,000.
"""

from __future__ import annotations

import random
import time

from pink.placement import plan

TARGET = 2000  # placements per second


def simulated(runners: int, tasks: int, seed: int = 1) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    nodes = [{"name": f"n{i}", "gpus": [f"n{i}-g{j}" for j in range(8)], "max_containers": 8,
              "state": "ready", "images": [str(rng.randrange(40)) for _ in range(3)]} for i in range(runners)]
    queued = [{"id": f"t{i}", "user": f"u{i % 50}", "created_at": float(i),
               "image": {"sha256": str(rng.randrange(40)), "size": 2**30},
               "params": {"gpus": rng.choice([0, 1, 1, 2, 4]), "priority": rng.choice([0, 0, 0, 1])}}
              for i in range(tasks)]
    return nodes, queued


def measure(runners: int = 1000, tasks: int = 10000, repeats: int = 3) -> dict:
    nodes, queued = simulated(runners, tasks)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = plan(queued, nodes, {}, {})
        times.append(time.perf_counter() - started)
    best = min(times)
    return {"runners": runners, "tasks": tasks, "placed": len(result.choices),
            "waiting": len(result.waiting), "seconds": best,
            "placements_per_second": len(result.choices) / best, "tasks_per_second": tasks / best}


def report(r: dict) -> list[str]:
    return [f"### 4. Placement: {r['runners']} runners, {r['tasks']} waiting tasks", "",
            "| what | value | target |", "|---|---|---|",
            f"| one pass over the queue | {r['seconds']:.2f} s | |",
            f"| placements made | {r['placed']} (others wait: cluster full) | |",
            f"| placements per second | {r['placements_per_second']:.0f} | {TARGET} |",
            f"| tasks considered per second | {r['tasks_per_second']:.0f} | |", ""]


if __name__ == "__main__":
    print("\n".join(report(measure())))
