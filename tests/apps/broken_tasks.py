"""A task module of the project that fails to import: only its own tasks may suffer."""

from __future__ import annotations

from pydantic import BaseModel


class Ping(BaseModel):
    key: str


async def ping(job: Ping) -> None:  # never reached
    pass


raise RuntimeError("broken_tasks fails at import, as a module with a bug would")
