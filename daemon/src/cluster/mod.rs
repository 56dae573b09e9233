//! The cluster: authenticated frames ([`wire`]) over nng sockets ([`transport`]),
//! the control messages nodes exchange ([`proto`]), what a node offers
//! ([`capabilities`]) and the planner that splits the model between nodes
//! ([`planner`]); the head node forms the cluster ([`head`]) and drives the
//! other nodes' stages as one link of its pipeline ([`remote`]); workers run their
//! stages ([`worker`]). A worker without the model file receives its slice of it from
//! the head ([`slices`]). What a peer can make a node hold before its frames are
//! authenticated is bounded ([`admission`]).

pub mod admission;
pub mod capabilities;
mod control;
pub mod head;
pub mod planner;
pub mod proto;
pub mod remote;
pub mod slices;
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
