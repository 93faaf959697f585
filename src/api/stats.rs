//! The two statistics documents of the API: `GetStatsReport` (counters,
//! for backends and exporters) and `GET /.hato/stats` (what lives in the
//! process now, for operators and `hato-load --churn`).

use crate::counters::{self, Group};
use crate::table::{ROLES, TRANSPORTS};
use crate::Shared;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// `GetStatsReport`: the connections now and every counter
/// ([`crate::counters`], hato's own names; Sora's report is
/// media-centric).
pub(super) fn stats_report(shared: &Shared) -> Value {
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
    let c = counters::read(shared);
    let mut report = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "node_name": shared.config.node_name(),
        "total_connections": census.total(),
        "connections": by_role(&[0, 1]),
        "connections_by_transport": {
            TRANSPORTS[0]: by_role(&[0]),
            TRANSPORTS[1]: by_role(&[1]),
        },
        "signaling_connections": shared.admission.connections(),
        "pushes": c.pushes,
        "pushes_by_target": c.pushes_by_target.iter().map(|&(k, v)| (k.to_owned(), Value::from(v))).collect::<serde_json::Map<_, _>>(),
        "deliveries": c.deliveries,
    });
    for group in [
        Group::Deliveries,
        Group::Drops,
        Group::Held,
        Group::Paced,
        Group::Sctp,
        Group::AuthWebhook,
        Group::EventWebhook,
        Group::Cluster,
        Group::History,
    ] {
        report[group.key()] = c.object(group);
    }
    let h = &shared.history.counts;
    report["history"]["bytes"] = h.bytes.load(Ordering::Relaxed).into();
    report["history"]["pushes"] = h.pushes.load(Ordering::Relaxed).into();
    report["history"]["channels"] = shared.history.channels().into();
    if let Some(cluster) = &shared.cluster {
        let mut nodes: Vec<String> = cluster.live_nodes().into_iter().collect();
        nodes.sort();
        let status = if cluster.available() {
            "connected"
        } else {
            "disconnected"
        };
        report["cluster"]["nats"] = status.into();
        report["cluster"]["other_nodes"] = nodes.into();
    }
    report
}

/// `GET /.hato/stats`: what lives in the process now, for operators and
/// `hato-load --churn` (sessions from accept to teardown, connections in
/// the table, WebRTC peers in the engine, tokio tasks alive).
pub(super) fn runtime_stats(shared: &Shared) -> String {
    let c = counters::read(shared);
    let e = shared.engine.stats();
    json!({
        "sessions": shared.sessions.load(Ordering::Relaxed),
        "signaling_connections": shared.admission.connections(),
        "connections": shared.table.len(),
        "live_peers": e.live_peers.load(Ordering::Relaxed),
        "alive_tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
        "pushes": c.pushes,
        "deliveries": c.deliveries,
        "drops": c.object(Group::Drops),
        "held": c.object(Group::Held),
        "paced": c.object(Group::Paced),
        "sctp": c.object(Group::Sctp),
    })
    .to_string()
}
