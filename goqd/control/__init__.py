"""The control socket: goqctl's protocol, the daemon's server and the client.

Request and result types live in ``goqd.control.protocol`` (imported as ``p`` by the
daemon); the ledger's reply Structs that travel as results (``Done``, ``StockChanged``,
``History``, ...) stay in ``goqd.messages``. Note that ``protocol.History`` is the
*request*; its reply is ``goqd.messages.History``.
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
