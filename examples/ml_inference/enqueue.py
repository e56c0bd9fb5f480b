"""Queue N inference requests and, with --wait, show who computed what.

nobs-amqp --app examples.ml_inference.app:project consume inference --processes 2
python -m examples.ml_inference.enqueue 8 --wait 60
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .app import InferenceRequest, InferenceResult, inference, project, result_path, run_inference


def requests(n: int, results_dir: str | Path, samples: int = 100_000) -> list[InferenceRequest]:
    batch = uuid.uuid4().hex[:8]
    return [
        InferenceRequest(request_id=f"{batch}-{i:04d}", samples=samples, seed=i, results_dir=str(results_dir))
        for i in range(n)
    ]


async def enqueue(batch: list[InferenceRequest]) -> list[str]:
    """Queue every request (confirms pipelined); the project must be open."""
    return await inference.queue_many(run_inference, batch)


def results(batch: list[InferenceRequest]) -> dict[str, InferenceResult]:
    """The results written so far, by request id."""
    found = {}
    for request in batch:
        path = result_path(request.results_dir, request.request_id)
        if path.exists():
            found[request.request_id] = InferenceResult.model_validate_json(path.read_text())
    return found


async def wait_for_results(batch: list[InferenceRequest], timeout: float) -> dict[str, InferenceResult]:  # noqa: ASYNC109
    """Poll the results folder until every request has its result, or `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while len(found := results(batch)) < len(batch) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)  # the worker writes files; there is nothing to wait on
    return found


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.ml_inference.enqueue", description=__doc__)
    parser.add_argument("n", type=int, nargs="?", default=8, help="how many requests (default 8)")
    parser.add_argument("--samples", type=int, default=100_000, help="feature vectors per request")
    parser.add_argument("--results-dir", default=str(Path(tempfile.gettempdir()) / "ml-example-results"))
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait this long for the results")
    args = parser.parse_args(argv)
    batch = requests(args.n, args.results_dir, args.samples)
    async with project:
        await enqueue(batch)
    print(f"queued {len(batch)} inference requests; results go to {args.results_dir}/<request id>.json")
    if not args.wait:
        return 0
    found = await wait_for_results(batch, args.wait)
    for result in sorted(found.values(), key=lambda r: r.request_id):
        print(
            f"{result.request_id}: {result.positives}/{result.samples} positive, mean score {result.mean_score:.4f} "
            f"(pid {result.pid}, {result.seconds:.2f} s)"
        )
    pids = sorted({r.pid for r in found.values()})
    print(f"{len(found)}/{len(batch)} results, computed by worker processes {pids}")
    return 0 if len(found) == len(batch) else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
