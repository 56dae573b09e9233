//! The cluster's wire layer: authenticated frames ([`frame`]) over nng sockets
//! ([`transport`]).

pub mod frame;
pub mod head;
pub mod plan;
pub mod remote;
pub mod transport;
pub mod worker;

pub use frame::{
    random_sender_id, DropReason, Dtype, Frame, FrameError, FrameKey, FrameMeta, FrameType, Limits,
    Opener, OpenerStats, Sealer, SeqDesc, StatsSnapshot,
};
pub use transport::{
    ControlClient, ControlServer, DialOptions, Packet, PipelineRx, PipelineTx, TransportError,
};
