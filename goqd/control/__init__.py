"""The control socket: goqctl's protocol, the daemon's server and the client.

Request and result types live in ``goqd.control.protocol`` (imported as ``p`` by the
daemon); the ledger's requests that goqctl sends as they are (``SetStock``, ``Link``,
``GetHistory``, ...) and its reply Structs that travel as results (``Done``,
``StockChanged``, ``History``, ...) stay in ``goqd.messages``, under one name each
(``messages.GetHistory`` is the request, ``messages.History`` its reply). What each
request does is ``goqd.control.operator``'s (not imported here: goqctl imports this
package and needs none of the daemon).
"""

from goqd.control.client import DaemonUnreachable, RemoteError, call, call_sync, new_request_id
from goqd.control.protocol import (
    MAX_REPLY_BYTES,
    MAX_REQUEST_BYTES,
    PROTOCOL_VERSION,
    ControlRequest,
    ControlResult,
    DaemonStatus,
    DiffReport,
    DiffRow,
    Envelope,
    Err,
    Ok,
    Progress,
    ProgressEnvelope,
    ReplyEnvelope,
    ReportProgress,
    StoreInfo,
    StoreList,
    is_mutating,
)
from goqd.control.server import PeerInfo, WithProgress, peer_allowed, serve_control

__all__ = [
    "MAX_REPLY_BYTES",
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "ControlRequest",
    "ControlResult",
    "DaemonStatus",
    "DaemonUnreachable",
    "DiffReport",
    "DiffRow",
    "Envelope",
    "Err",
    "Ok",
    "PeerInfo",
    "Progress",
    "ProgressEnvelope",
    "RemoteError",
    "ReplyEnvelope",
    "ReportProgress",
    "StoreInfo",
    "StoreList",
    "WithProgress",
    "call",
    "call_sync",
    "is_mutating",
    "new_request_id",
    "peer_allowed",
    "serve_control",
]
