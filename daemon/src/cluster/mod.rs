//! The cluster's wire layer: authenticated frames ([`wire`]) over nng sockets
//! ([`transport`]).

pub mod head;
pub mod plan;
pub mod transport;
pub mod wire;
pub mod worker;

pub use transport::{
    ControlClient, ControlServer, DialOptions, Packet, PipelineRx, PipelineTx, TransportError,
};
pub use wire::{
    random_sender_id, DropReason, Dtype, Frame, FrameError, FrameKey, FrameType, Limits, Opener,
    OpenerStats, Sealer, StatsSnapshot,
};
