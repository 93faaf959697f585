//! The two statistics documents of the API: `GetStatsReport` (counters,
//! for backends and exporters) and `GET /.hato/stats` (what lives in the
//! process now, for operators and `hato-load --churn`).

use crate::table::{ROLES, TRANSPORTS};
use crate::Shared;
use hato_signaling::api::Scope;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// `GetStatsReport`: server-wide counters (hato's own names; Sora's
/// report is media-centric).
pub(super) fn stats_report(shared: &Shared) -> Value {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let t = &shared.table.stats;
    let e = shared.engine.stats();
    let census = shared.table.census();
    // Per role, over the transports `on` selects.
    let by_role = |on: &[usize]| {
        let mut v = serde_json::Map::new();
        for (role, counts) in ROLES.iter().zip(census.by_role_and_transport) {
            v.insert(
                role.as_str().into(),
                on.iter().map(|&t| counts[t]).sum::<usize>().into(),
            );
        }
        Value::Object(v)
    };
    let deliveries = n(&t.deliveries);
    let dc_deliveries = n(&t.deliveries_datachannel);
    let hook = shared.auth_webhook.as_ref().map(|h| {
        json!({
            "calls": n(&h.counters.calls),
            "allowed": n(&h.counters.allowed),
            "denied": n(&h.counters.denied),
            "failures": n(&h.counters.failures),
        })
    });
    let events = shared.event_webhook.as_ref().map(|h| {
        let c = &h.counters;
        json!({
            "queued": n(&c.queued),
            "sent": n(&c.sent),
            "failed_calls": n(&c.failed_calls),
            "given_up": n(&c.given_up),
            "dropped": n(&c.dropped),
        })
    });
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node_name": shared.config.node_name(),
        "total_connections": census.total(),
        "connections": by_role(&[0, 1]),
        "connections_by_transport": {
            TRANSPORTS[0]: by_role(&[0]),
            TRANSPORTS[1]: by_role(&[1]),
        },
        "signaling_connections": shared.admission.connections(),
        "pushes": n(&t.pushes),
        "pushes_by_target": {
            "PushChannel": n(&t.pushes_by_target[Scope::Channel as usize]),
            "PushClient": n(&t.pushes_by_target[Scope::Client as usize]),
            "PushConnection": n(&t.pushes_by_target[Scope::Connection as usize]),
            "PushChannelByRole": n(&t.pushes_by_target[Scope::ChannelByRole as usize]),
        },
        "deliveries": deliveries,
        "deliveries_by_transport": {
            "websocket": deliveries.saturating_sub(dc_deliveries),
            "datachannel": dc_deliveries,
        },
        "drops": {
            "outbox_overflow": n(&t.overflows),
            "undeliverable": n(&t.undeliverable),
            "channel_failures": n(&t.channel_failures),
            "refused_connections": n(&shared.admission.refused),
            "refused_channels": n(&e.refused_channels),
            "failed_sends": n(&e.failed_sends),
            "dropped_datagrams_unknown": n(&e.dropped_unknown),
            "dropped_datagrams_integrity": n(&e.dropped_integrity),
        },
        "auth_webhook": hook,
        "event_webhook": events,
        "cluster": shared.cluster.as_ref().map(|c| {
            let s = &c.stats;
            let mut nodes: Vec<String> = c.live_nodes().into_iter().collect();
            nodes.sort();
            json!({
                "nats": if c.available() { "connected" } else { "disconnected" },
                "other_nodes": nodes,
                "published": n(&s.published),
                "received": n(&s.received),
                "unavailable": n(&s.unavailable),
                "resyncs": n(&s.resyncs),
                "nodes_lost": n(&s.nodes_lost),
                "publish_failures": n(&s.publish_failures),
            })
        }),
    })
}

/// `GET /.hato/stats`: what lives in the process now, for operators and
/// `hato-load --churn` (sessions from accept to teardown, connections in
/// the table, WebRTC peers in the engine, tokio tasks alive).
pub(super) fn runtime_stats(shared: &Shared) -> String {
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let t = &shared.table.stats;
    let e = shared.engine.stats();
    json!({
        "sessions": shared.sessions.load(Ordering::Relaxed),
        "signaling_connections": shared.admission.connections(),
        "connections": shared.table.len(),
        "live_peers": e.live_peers.load(Ordering::Relaxed),
        "alive_tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        "refused_connections": n(&shared.admission.refused),
        "pushes": n(&t.pushes),
        "deliveries": n(&t.deliveries),
        "overflows": n(&t.overflows),
        "undeliverable": n(&t.undeliverable),
        "channel_failures": n(&t.channel_failures),
        "failed_sends": n(&e.failed_sends),
        "refused_channels": n(&e.refused_channels),
    })
    .to_string()
}
