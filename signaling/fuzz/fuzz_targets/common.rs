//! A session machine in the state the first input byte picks, so that
//! every message meets the machine before and after each step it cares
//! about (answer applied, connected, switched), in every mode.

use hato_signaling::session::{Action, Machine, Mode, Rules};
use hato_signaling::SYSTEM_LABELS;
use std::time::{Duration, Instant};

pub const ANSWER: &[u8] =
    br#"{"type":"answer","sdp":"v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=max-message-size:262144\r\n"}"#;

pub fn machine(flags: u8) -> (Machine, Instant) {
    let now = Instant::now();
    let rules = Rules {
        answer_timeout: Duration::from_secs(10),
        establish_timeout: Duration::from_secs(20),
        ping_interval: Duration::from_secs(5),
        pong_timeout: Duration::from_secs(15),
        client_message_limit: 64 * 1024,
        data_channel_message_limit: 262_144,
        max_candidates: 8,
    };
    let mode = Mode {
        data_channel_signaling: flags & 4 != 0,
        ignore_disconnect_websocket: flags & 8 != 0,
        compress: flags & 16 != 0,
        libwebrtc: flags & 32 != 0,
    };
    let mut m = Machine::new(now, rules, mode);
    let stage = flags & 3;
    if stage >= 1 {
        m.on_ws_text(now, ANSWER);
        drain(&mut m);
        m.answer_applied(now, Ok(()));
    }
    if stage >= 2 {
        m.on_transport_connected();
    }
    if stage >= 3 {
        for (label, _) in SYSTEM_LABELS {
            m.on_channel_open(label);
        }
    }
    drain(&mut m);
    (m, now)
}

/// Takes every action; an answer handed to the shell must still say a
/// sane `a=max-message-size`.
pub fn drain(m: &mut Machine) {
    while let Some(a) = m.poll_action() {
        if let Action::Register {
            message_limit: Some(n),
        } = a
        {
            assert!(n >= hato_signaling::sdp::MIN_MAX_MESSAGE_SIZE);
        }
    }
}
