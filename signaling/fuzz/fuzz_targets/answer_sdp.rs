//! The path of a client's answer SDP: the session machine (the
//! a=max-message-size floor, the native-SDK rewrite) and then the SDP
//! parser the engine applies it with.
#![no_main]
use hato_signaling::sdp;
use hato_signaling::session::Action;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (mut m, now) = common::machine(flags & !3);
    let answer = serde_json::json!({"type": "answer", "sdp": text}).to_string();
    m.on_ws_text(now, answer.as_bytes());
    while let Some(action) = m.poll_action() {
        if let Action::ApplyAnswer(applied) = action {
            if let Some(n) = sdp::max_message_size(&applied) {
                assert!(n >= sdp::MIN_MAX_MESSAGE_SIZE || !sdp::declares_max_message_size(text));
            }
            let mut reader = std::io::Cursor::new(applied.as_bytes());
            let _ = rtc_sdp::description::session::SessionDescription::unmarshal(&mut reader);
        }
    }
});
