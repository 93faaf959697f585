//! Every client message on each DataChannel label, zlib-framed or not,
//! text or binary, in every state and mode.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const LABELS: [&str; 5] = ["signaling", "notify", "push", "stats", "#spam"];

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&pick, message)) = rest.split_first() else {
        return;
    };
    let (mut m, now) = common::machine(flags);
    let label = LABELS[usize::from(pick) % LABELS.len()];
    let _ = m.on_dc_message(now, label, message, pick & 0x80 != 0);
    common::drain(&mut m);
});
