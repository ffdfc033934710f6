"""The request-retransmit loop of STUN and TURN transactions (RFC 8489 §6.2.1), shared by the STUN
client (common/nat/reach.py) and the TURN client (common/nat/turn.py): each keeps its own schedule."""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable


async def answered_with_retransmits(answer: asyncio.Future, send: Callable[[], None], schedule: Iterable[float],
                                    timeout: float) -> bool:
    """Send at each offset of `schedule` (seconds from now, those below `timeout`) until `answer` is done;
    True if it was done within `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for at in schedule:
        if at >= timeout:
            break
        wait = at - (loop.time() - start)
        if wait > 0:
            done, _ = await asyncio.wait({answer}, timeout=wait)
            if done:
                return True
        send()
    done, _ = await asyncio.wait({answer}, timeout=max(timeout - (loop.time() - start), 0.0))
    return bool(done)
