//! The Sora signaling protocol as data: message types, validation of
//! `connect`, connection ids, the zlib framing of `compress: true`
//! DataChannels and the few SDP facts the server needs.
//!
//! Nothing here touches a socket or a clock that a test cannot set, so
//! every protocol rule is checked with plain function calls. The wire facts
//! are written down in `docs/protocol.md`; a section number in a comment
//! (`§3.9`) points there.

pub mod admit;
pub mod api;
pub mod connect;
pub mod event;
pub mod id;
pub mod message;
pub mod sdp;
pub mod session;
pub mod time;
pub mod zlib;

pub use connect::{ConnectError, ConnectRequest, Role};
pub use message::{ClientMessage, DataChannelSpec, Offer, SYSTEM_LABELS};
