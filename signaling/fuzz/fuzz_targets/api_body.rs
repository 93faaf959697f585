//! The body of each API target. What a push passes on must be a JSON
//! object that makes a valid push message, byte for byte as sent.
#![no_main]
use hato_signaling::api::{parse, Audience, Operation, TARGETS};
use hato_signaling::message::push_json;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let (_, operation) = TARGETS[usize::from(pick) % TARGETS.len()];
    if operation == Operation::History {
        if let Ok(q) = hato_signaling::api::parse_history(body) {
            assert!(q.limit as u64 <= hato_signaling::api::MAX_HISTORY_LIMIT);
        }
        return;
    }
    if operation == Operation::Batch {
        if let Ok(items) = hato_signaling::api::parse_batch(body) {
            for item in items {
                let data = item.call.data.expect("a batch item is a push").get();
                serde_json::from_str::<&RawValue>(&push_json(data, "epoch", 1)).expect("the push message is JSON");
            }
        }
        return;
    }
    let Ok(call) = parse(operation, body) else {
        return;
    };
    if let Some(data) = call.data.map(RawValue::get) {
        assert!(data.starts_with('{'));
        let text = std::str::from_utf8(body).unwrap();
        assert!(text.contains(data), "data is a slice of the body as sent");
        let message = push_json(data, "epoch", 1);
        serde_json::from_str::<&RawValue>(&message).expect("the push message is JSON");
    } else if let Operation::Disconnect(_) = operation {
        serde_json::from_str::<&RawValue>(&call.echo).expect("the echo is JSON");
    }
    if let Audience::Client(id) | Audience::Connection(id) = &call.audience {
        let _ = id.len();
    }
});
