//! Every client message on the WebSocket, in every state and mode.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, message)) = data.split_first() else {
        return;
    };
    let (mut m, now) = common::machine(flags);
    m.on_ws_text(now, message);
    common::drain(&mut m);
    if flags & 64 != 0 {
        m.on_ws_binary();
        m.on_ws_closed();
        common::drain(&mut m);
    }
});
