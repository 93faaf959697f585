//! Every counter hato keeps, read in one place under one set of names.
//!
//! The counters live where they are counted (the table's, the engine's,
//! the admissions', the webhooks', the cluster's atomics); [`read`] takes
//! them all at once, and each view is built from that reading: `/metrics`
//! (a family per [`Group`], the name as its label), `GetStatsReport` and
//! `GET /.hato/stats` (an object per group, the name as its key) and the
//! totals logged at shutdown. A counter added here appears in all four.

use crate::Shared;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// A family of counters, each named by what it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Push deliveries queued, by transport.
    Deliveries,
    /// Things dropped or refused, by reason.
    Drops,
    /// Datagrams the engine held until their peer was ready, by what they
    /// waited for.
    Held,
    /// What waited for its turn, by what it was.
    Paced,
    /// What the DataChannel engine's SCTP did beyond the ordinary, by what.
    Sctp,
    /// Auth webhook calls, by outcome (with an auth webhook).
    AuthWebhook,
    /// Event webhook events, by outcome (with an event webhook).
    EventWebhook,
    /// Cluster messages and events (with a cluster).
    Cluster,
    /// History and recovery events.
    History,
}

impl Group {
    /// The key of the group in the JSON documents.
    pub fn key(self) -> &'static str {
        match self {
            Group::Deliveries => "deliveries_by_transport",
            Group::Drops => "drops",
            Group::Held => "held",
            Group::Paced => "paced",
            Group::Sctp => "sctp",
            Group::AuthWebhook => "auth_webhook",
            Group::EventWebhook => "event_webhook",
            Group::Cluster => "cluster",
            Group::History => "history",
        }
    }
}

/// One counter's value now.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    pub group: Group,
    pub name: &'static str,
    pub value: u64,
}

/// Every counter now, and the pushes and deliveries.
pub struct Counters {
    pub pushes: u64,
    /// Pushes accepted, by target: PushChannel, PushClient, PushConnection,
    /// PushChannelByRole.
    pub pushes_by_target: [(&'static str, u64); 4],
    pub deliveries: u64,
    pub readings: Vec<Reading>,
}

fn n(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Reads every counter of the node.
pub fn read(shared: &Shared) -> Counters {
    let t = &shared.table.stats;
    let e = shared.engine.stats();
    let mut readings = Vec::with_capacity(40);
    let mut add = |group: Group, values: &[(&'static str, u64)]| {
        readings.extend(
            values
                .iter()
                .map(|&(name, value)| Reading { group, name, value }),
        );
    };
    let deliveries = n(&t.deliveries);
    let dc = n(&t.deliveries_datachannel);
    add(
        Group::Deliveries,
        &[
            ("websocket", deliveries.saturating_sub(dc)),
            ("datachannel", dc),
        ],
    );
    add(
        Group::Drops,
        &[
            ("outbox_overflow", n(&t.outbox_overflows)),
            ("undeliverable", n(&t.undeliverable)),
            ("channel_failure", n(&t.channel_failures)),
            ("refused_connection", n(&shared.admission.refused)),
            ("refused_api_connection", n(&shared.api_admission.refused)),
            ("bad_proxy_header", n(&shared.admission.bad_proxy_headers)),
            ("refused_channel", n(&e.refused_channels)),
            ("failed_send", n(&e.failed_sends)),
            ("message_unread", n(&e.dropped_messages)),
            ("datagram_unsent", n(&e.dropped_outbound)),
            ("datagram_unknown", n(&e.dropped_unknown)),
            ("datagram_integrity", n(&e.dropped_integrity)),
            ("datagram_early", n(&e.dropped_early)),
            ("datagram_spoofed", n(&e.refused_moves)),
            ("candidate_refused", n(&e.refused_candidates)),
            ("check_paced", n(&e.paced_checks)),
            ("notify_unannounced", n(&t.notify_unannounced)),
        ],
    );
    add(
        Group::Held,
        &[("answer", n(&e.held_early)), ("ice", n(&e.held_before_ice))],
    );
    add(
        Group::Paced,
        &[
            ("connect", n(&shared.admission.paced)),
            ("notify", n(&t.notify_held)),
        ],
    );
    add(Group::Sctp, &[("resent_on_return", n(&e.resent_on_return))]);
    if let Some(h) = &shared.auth_webhook {
        let c = &h.counters;
        add(
            Group::AuthWebhook,
            &[
                ("allowed", n(&c.allowed)),
                ("denied", n(&c.denied)),
                ("failed", n(&c.failures)),
            ],
        );
    }
    if let Some(h) = &shared.event_webhook {
        let c = &h.counters;
        add(
            Group::EventWebhook,
            &[
                ("queued", n(&c.queued)),
                ("sent", n(&c.sent)),
                ("failed_call", n(&c.failed_calls)),
                ("given_up", n(&c.given_up)),
                ("dropped", n(&c.dropped)),
            ],
        );
    }
    if let Some(c) = &shared.cluster {
        let s = &c.stats;
        add(
            Group::Cluster,
            &[
                ("published", n(&s.published)),
                ("received", n(&s.received)),
                ("publish_failure", n(&s.publish_failures)),
                ("unavailable", n(&s.unavailable)),
                ("resync", n(&s.resyncs)),
                ("node_lost", n(&s.nodes_lost)),
                ("refused", n(&s.refused)),
                (
                    "stream_conflict",
                    c.streams.as_ref().map_or(0, |s| n(&s.conflicts)),
                ),
                ("refilled", n(&s.refilled)),
            ],
        );
    }
    let h = &shared.history.counts;
    add(
        Group::History,
        &[
            ("recovered", n(&h.recovered)),
            ("recovery_gap", n(&h.recovery_gaps)),
            ("evicted", n(&h.evicted)),
        ],
    );
    let by_target = |i: usize| n(&t.pushes_by_target[i]);
    use hato_signaling::api::Scope;
    Counters {
        pushes: n(&t.pushes),
        pushes_by_target: [
            ("PushChannel", by_target(Scope::Channel as usize)),
            ("PushClient", by_target(Scope::Client as usize)),
            ("PushConnection", by_target(Scope::Connection as usize)),
            (
                "PushChannelByRole",
                by_target(Scope::ChannelByRole as usize),
            ),
        ],
        deliveries,
        readings,
    }
}

impl Counters {
    /// The readings of `group`, by name.
    pub fn of(&self, group: Group) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.readings
            .iter()
            .filter(move |r| r.group == group)
            .map(|r| (r.name, r.value))
    }

    /// `group` as a JSON object, or `null` when the node has none of it (no
    /// webhook, no cluster).
    pub fn object(&self, group: Group) -> Value {
        let map: Map<String, Value> = self.of(group).map(|(k, v)| (k.into(), v.into())).collect();
        if map.is_empty() {
            Value::Null
        } else {
            Value::Object(map)
        }
    }

    /// The counters that are not zero, as `group.name=value` words: the
    /// totals logged at shutdown.
    pub fn nonzero_line(&self) -> String {
        let mut line = format!("pushes={} deliveries={}", self.pushes, self.deliveries);
        for r in self.readings.iter().filter(|r| r.value > 0) {
            line.push_str(&format!(" {}.{}={}", r.group.key(), r.name, r.value));
        }
        line
    }
}
