"""RFC 5277 event notifications: nat-session-event for every session created or destroyed, and natmig-state's state-change.

A subscription's subtree filter selects either form or both (no filter: both);
the NAT's own migration follows nat-session-event, the generic engine state-change.

One provider watch is shared by all subscribed NETCONF sessions (one netlink
event socket however many controllers listen); it starts with the first
subscription and stops with the last.  A thread reads the watch and hands
each event, already encoded, to every subscriber's ``deliver`` callable
(which must be thread-safe; the SSH server passes one that hops onto its
event loop).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Callable

from ..codec import Codec
from ..statemodel import COMMON_NS
from ..wire.state import CHANGE, change_body
from .provider import SessionProvider, Watch

log = logging.getLogger(__name__)

NOTIFICATION_NS = "urn:ietf:params:xml:ns:netconf:notification:1.0"
NOTIFICATION_CAPABILITY = "urn:ietf:params:netconf:capability:notification:1.0"
INTERLEAVE_CAPABILITY = "urn:ietf:params:netconf:capability:interleave:1.0"
STREAMS = ("NETCONF",)
#: provider event kind -> the module's event enum.
EVENT_NAMES = {"new": "created", "destroy": "destroyed"}
#: The same events in natmig-state's state-change (what the generic engine follows).
CHANGE_NAMES = {"new": "created", "destroy": "deleted"}

Deliver = Callable[[bytes], None]


def event_time(when: datetime | None = None) -> str:
    """RFC 3339 date-and-time of now (or ``when``), UTC, microseconds."""
    return (when or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def wrap_notification(body: bytes, when: datetime | None = None) -> bytes:
    """A ``<notification>`` message around an event body."""
    return (f'<notification xmlns="{NOTIFICATION_NS}"><eventTime>{event_time(when)}</eventTime>').encode() + body + b"</notification>"


class Fanout:
    """Sessions subscribed to stream NETCONF, and one notification sent to those whose filter selects it."""

    #: (namespace, name) of the notifications this hub sends: what a subscription's filter may select.
    notifications: frozenset[tuple[str, str]] = frozenset()

    def __init__(self) -> None:
        self._subs: dict[int, tuple[Deliver, frozenset[tuple[str, str]] | None]] = {}
        self._mutex = threading.Lock()
        self.sent = 0

    def subscribe(self, sid: int, deliver: Deliver, select: frozenset[tuple[str, str]] | None = None) -> None:
        """Send to ``deliver`` the notifications ``select`` names (None: every one)."""
        with self._mutex:
            self._subs[sid] = (deliver, select)

    def subscribed(self, sid: int) -> bool:
        return sid in self._subs

    def unsubscribe(self, sid: int) -> None:
        with self._mutex:
            self._subs.pop(sid, None)

    def close(self) -> None:
        with self._mutex:
            self._subs.clear()

    def send(self, body: bytes, which: tuple[str, str]) -> None:
        """Wrap ``body`` (the notification ``which``: namespace, name) in a <notification> and deliver it to every
        subscriber that selected it."""
        with self._mutex:
            targets = [d for d, select in self._subs.values() if select is None or which in select]
        if not targets:
            return
        msg = wrap_notification(body)
        for deliver in targets:
            try:
                deliver(msg)
                self.sent += 1
            except Exception as e:  # noqa: BLE001 - one broken subscriber must not stop the others
                log.warning("notification not delivered: %s", e)


class NotificationHub:
    """Fans the provider's session events out to subscribed sessions."""

    def __init__(self, provider: SessionProvider, codec: Codec) -> None:
        self.provider = provider
        self.codec = codec
        #: the forms of an event, in the order a subscriber of both gets them: the NAT's own first.
        self._forms = ((codec.ns, "nat-session-event"), (COMMON_NS, CHANGE))
        self.notifications = frozenset(self._forms)
        self._subs: dict[int, tuple[Deliver, frozenset[tuple[str, str]]]] = {}
        self._mutex = threading.Lock()
        self._watch: Watch | None = None
        self._thread: threading.Thread | None = None
        self.sent = 0

    def subscribe(self, sid: int, deliver: Deliver, select: "frozenset[tuple[str, str]] | None" = None) -> None:
        """Start sending events to ``deliver`` for session ``sid``: as nat-session-event, state-change, or both (``select``)."""
        with self._mutex:
            self._subs[sid] = (deliver, self.notifications if select is None else select)
            if self._watch is None:
                # Opened here, before the create-subscription reply leaves, so
                # no event after the reply is missed.
                self._watch = self.provider.watch()
                self._thread = threading.Thread(target=self._pump, args=(self._watch,), name="natmig-notify", daemon=True)
                self._thread.start()
                log.info("session event watch started")

    def subscribed(self, sid: int) -> bool:
        """Whether session ``sid`` has a subscription."""
        return sid in self._subs

    def unsubscribe(self, sid: int) -> None:
        """Stop sending to ``sid``; the watch stops with the last subscriber."""
        with self._mutex:
            self._subs.pop(sid, None)
            if self._subs or self._watch is None:
                return
            watch, self._watch = self._watch, None
        watch.close()
        log.info("session event watch stopped")

    def close(self) -> None:
        """Stop everything (agent shutdown)."""
        with self._mutex:
            self._subs.clear()
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()

    def _pump(self, watch: Watch) -> None:
        while self._watch is watch:
            try:
                ev = watch.get(timeout=0.5)
            except Exception as e:  # the watch broke: tell the log, stop this pump
                log.error("session event watch failed: %s", e)
                return
            if ev is None:
                continue
            name = EVENT_NAMES.get(ev.kind)
            if name is None:
                continue
            with self._mutex:
                targets = list(self._subs.values())
            msgs: dict[tuple[str, str], bytes | None] = {}  # each form encoded once, only when a subscriber wants it
            for deliver, select in targets:
                for which in (f for f in self._forms if f in select):
                    if which not in msgs:
                        try:
                            msgs[which] = wrap_notification(self.codec.encode_event_xml(name, ev.session) if which[1] != CHANGE
                                                            else change_body(self.codec.json_name, CHANGE_NAMES[ev.kind],
                                                                             self.codec.encode_xml([ev.session], root=None).decode()).encode())
                        except Exception as e:  # one odd event must not end the stream
                            log.error("cannot encode %s event of %s: %s", name, ev.session, e)
                            msgs[which] = None
                    msg = msgs[which]
                    if msg is None:
                        continue
                    try:
                        deliver(msg)
                        self.sent += 1
                    except Exception as e:  # one broken subscriber must not stop the others
                        log.warning("notification not delivered: %s", e)
