"""A task module no worker with `modules=[...]` lists: a message naming it must not import it."""

from __future__ import annotations

from pydantic import BaseModel

IMPORTED = True


class Ping(BaseModel):
    key: str


async def ping(job: Ping) -> None:
    pass
