"""CPU-bound inference: a sync task, one at a time per process, several processes.

    nobs-amqp --app examples.ml_inference.app:project consume inference --processes 2
    python -m examples.ml_inference.enqueue 8

A sync task runs in a worker's thread pool, so heartbeats keep flowing while it
computes; but pure-Python number crunching holds the GIL, so threads add nothing.
The `inference` worker therefore runs one task at a time (`concurrency=1`, which
also makes it hold just one unacked message) and `--processes N` runs N worker
processes: RabbitMQ hands each the next request as soon as it has finished one.

The "model" is a logistic regression with fixed weights over features generated
from the request's seed: deterministic, stdlib only, and CPU-bound.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

from pydantic import BaseModel, Field

from nobs_amqp import Project, Worker

inference = Worker("inference", concurrency=1, time_limit=300)

project = Project(name="ml-example", workers=[inference])

WEIGHTS = (0.8, -1.2, 0.5, 2.0, -0.3, 1.1, -0.7, 0.25)
BIAS = -0.1
THRESHOLD = 0.5


class InferenceRequest(BaseModel):
    request_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,100}$")  # names the result file
    samples: int = Field(default=100_000, ge=1, le=10_000_000)
    seed: int = 0
    results_dir: str


class InferenceResult(BaseModel):
    request_id: str
    samples: int
    positives: int
    mean_score: float
    pid: int
    seconds: float


def score(features: list[float]) -> float:
    """The model: P(positive | features)."""
    z = BIAS + sum(w * x for w, x in zip(WEIGHTS, features, strict=True))
    return 1.0 / (1.0 + math.exp(-z))


def predict(samples: int, seed: int) -> tuple[int, float]:
    """Score `samples` feature vectors drawn from `seed`: (how many are positive, the mean score)."""
    rng = random.Random(seed)
    positives = 0
    total = 0.0
    for _ in range(samples):
        p = score([rng.gauss(0.0, 1.0) for _ in WEIGHTS])
        total += p
        positives += p >= THRESHOLD
    return positives, total / samples


def result_path(results_dir: str | Path, request_id: str) -> Path:
    return Path(results_dir) / f"{request_id}.json"


def run_inference(request: InferenceRequest) -> None:
    started = time.perf_counter()
    positives, mean = predict(request.samples, request.seed)
    result = InferenceResult(
        request_id=request.request_id,
        samples=request.samples,
        positives=positives,
        mean_score=mean,
        pid=os.getpid(),
        seconds=time.perf_counter() - started,
    )
    path = result_path(request.results_dir, request.request_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(result.model_dump_json())
    partial.replace(path)  # readers see the whole result or none
