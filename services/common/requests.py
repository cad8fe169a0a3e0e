"""A NATS request to a service that several interchangeable replicas serve in one queue group (the scheduler's
leader and standby, the state_store's replicas).

A request that nobody was subscribed to (NoResponders) was never delivered, so sending it again is safe whatever it
asks: while one replica takes over from another or restarts, the caller sees a short wait within its deadline, not
an error. A request that was delivered and not answered in time may have been acted on, so it is not sent again.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from services.common.errors import Unavailable

RESEND_FIRST_S = 0.05
"""The first pause before a request nobody was subscribed to is sent again; it doubles up to RESEND_MOST_S."""
RESEND_MOST_S = 0.5


async def request(
    nats: NatsClient, subject: str, payload: bytes, *, timeout_s: float, resend: bool,
    headers: dict[str, str] | None = None,
) -> Msg:
    """The answer to ``payload`` on ``subject`` within ``timeout_s``, else Unavailable. With ``resend``, a request
    nobody was subscribed to is sent again until the deadline; without, that is said at once (a worker's own
    subject: nobody serving it means the worker is gone)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pause_s = RESEND_FIRST_S
    while True:
        left_s = deadline - loop.time()
        if pause_s > RESEND_FIRST_S and left_s < RESEND_FIRST_S:  # resent, and woke too late for one more fair try
            raise Unavailable(f"nobody serves {subject}")
        try:
            return await nats.request(subject, payload, timeout=max(left_s, 0.001), headers=headers)
        except (TimeoutError, NatsTimeoutError):
            raise Unavailable(f"{subject} did not answer within {timeout_s} s") from None
        except NoRespondersError:
            if not resend or left_s <= pause_s:
                raise Unavailable(f"nobody serves {subject}") from None
        except ConnectionClosedError:
            raise Unavailable(f"the NATS connection is closed; {subject} was not asked") from None
        await asyncio.sleep(pause_s)
        pause_s = min(2 * pause_s, RESEND_MOST_S)
