//! `connect` as the first WebSocket message: parsing and validation.
#![no_main]
use hato_signaling::{ClientMessage, ConnectRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ClientMessage::Connect(v)) = ClientMessage::parse(data) {
        if let Ok(c) = ConnectRequest::from_value(v) {
            assert!(!c.channel_id.is_empty());
            assert!(c.client_id.as_deref() != Some(""));
        }
    }
});
