//! The control plane: webhooks over HTTPS (a private CA, a wrong CA,
//! mutual TLS), access tokens checked by hato, draining and redirects.
//! Part of the `server` test binary.

use super::*;
use std::sync::{Arc, Mutex};

/// A test CA and certificates it signs, written as PEM files.
struct Pki {
    dir: std::path::PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("hato-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("hato test CA {name}"));
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `names`, signed by the CA: (chain file, key file).
    fn issue(&self, file: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        let (c, k) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// An HTTPS auth and event webhook on loopback with a certificate of
/// `pki`; with `clients`, a client certificate of that CA is required.
/// Answers `allowed: false` to a connect whose metadata says deny; records
/// every body.
async fn https_webhook(pki: &Pki, clients: Option<&Pki>) -> (String, Arc<Mutex<Vec<Value>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = pki.issue("server", &["127.0.0.1"]);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = Arc::new(builder.with_single_cert(chain, key).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/hook",
        listener.local_addr().unwrap().port()
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let bodies = seen.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (
                tokio_rustls::TlsAcceptor::from(config.clone()),
                seen.clone(),
            );
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let deny = v["metadata"]["deny"] == true;
                            seen.lock().unwrap().push(v);
                            let answer = if deny {
                                r#"{"allowed":false,"reason":"NOT-ON-THE-LIST"}"#
                            } else {
                                r#"{"allowed":true}"#
                            };
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from_static(
                                    answer.as_bytes(),
                                )),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, bodies)
}

/// The close reason of a refused connect.
async fn refused_with(s: &Server, metadata: Value) -> String {
    let mut o = opts(s, "tls-hook", "recvonly");
    o.extra.insert("metadata".into(), metadata);
    match Client::connect(&o).await {
        Err(hato::client::ClientError::Refused { code: 4490, reason }) => reason,
        other => panic!("{:?}", other.map(|_| "connected")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_over_https_with_a_private_ca_and_mutual_tls() {
    let pki = Pki::new("a");
    let (url, seen) = https_webhook(&pki, None).await;

    // The test CA trusted: allowed, denied, and the events arrive.
    let s = server_with(|c| {
        c.auth_webhook_url = Some(url.clone());
        c.event_webhook_url = Some(url.clone());
        c.webhook_ca_file = Some(pki.ca_file());
    })
    .await;
    let _ok = connected(&opts(&s, "tls-hook", "recvonly")).await;
    assert_eq!(
        refused_with(&s, json!({"deny": true})).await,
        "NOT-ON-THE-LIST"
    );
    let mut created = false;
    for _ in 0..100 {
        created = seen
            .lock()
            .unwrap()
            .iter()
            .any(|v| v["type"] == "connection.created");
        if created {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        created,
        "the event webhook got connection.created over https"
    );
    drop(s);

    // Another CA trusted (and the system's, which do not know the test
    // CA): the certificate is refused, and so is the connect.
    let other = Pki::new("b");
    let s = server_with(|c| {
        c.auth_webhook_url = Some(url.clone());
        c.webhook_ca_file = Some(other.ca_file());
    })
    .await;
    let reason = refused_with(&s, json!({})).await;
    assert!(
        reason.starts_with("AUTH-WEBHOOK-ERROR: cannot reach the webhook"),
        "{reason}"
    );
    drop(s);

    // A webhook that requires a client certificate of its CA: refused
    // without one, allowed with one.
    let (mtls_url, _) = https_webhook(&pki, Some(&pki)).await;
    let s = server_with(|c| {
        c.auth_webhook_url = Some(mtls_url.clone());
        c.webhook_ca_file = Some(pki.ca_file());
    })
    .await;
    let reason = refused_with(&s, json!({})).await;
    assert!(reason.starts_with("AUTH-WEBHOOK-ERROR"), "{reason}");
    drop(s);
    let (client_cert, client_key) = pki.issue("client", &["hato"]);
    let s = server_with(|c| {
        c.auth_webhook_url = Some(mtls_url.clone());
        c.webhook_ca_file = Some(pki.ca_file());
        c.webhook_client_cert = Some(client_cert.clone());
        c.webhook_client_key = Some(client_key.clone());
    })
    .await;
    let _ok = connected(&opts(&s, "tls-hook", "recvonly")).await;
    let _ = std::fs::remove_dir_all(&pki.dir);
    let _ = std::fs::remove_dir_all(&other.dir);
}

/// Access tokens checked by hato: a valid one connects without asking the
/// auth webhook (and pins what its claims say), every failed check is
/// refused with 4490 and names the check, without the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_are_checked_by_hato_without_the_webhook() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    const SECRET: &str = "a secret of at least thirty-two bytes";
    let (hook_url, asked) = auth_webhook().await;
    let s = server_with(|c| {
        c.auth_jwt_secret = Some(SECRET.into());
        c.auth_webhook_url = Some(hook_url.clone());
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |claims: Value| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    let with_token = |t: &str, role: &str| {
        let mut o = opts(&s, "jwt", role);
        o.extra
            .insert("metadata".into(), json!({"access_token": t}));
        o
    };
    let good = token(
        json!({"channel_id": "jwt", "exp": now + 60, "client_id": "pinned",
                            "role": "recvonly", "metadata": {"plan": "pro"}}),
    );
    let mut c = connected(&with_token(&good, "recvonly")).await;
    assert!(
        asked.lock().unwrap().is_empty(),
        "a valid token skips the webhook"
    );
    let (_, list) = api(
        &s,
        "Sora_20201013.ListChannelConnections",
        r#"{"channel_id":"jwt"}"#,
    )
    .await;
    assert_eq!(list[0]["client_id"], "pinned");
    push(
        &s,
        "Sora_20160711.PushClient",
        json!({"channel_id": "jwt", "client_id": "pinned", "data": {"t": 1}}),
    )
    .await;
    assert_eq!(next_push(&mut c).await.unwrap().0["data"]["t"], 1);
    for (claims, role, want) in [
        (
            json!({"channel_id": "jwt", "exp": now - 120}),
            "recvonly",
            "expired (exp)",
        ),
        (
            json!({"channel_id": "jwt", "exp": now + 60, "nbf": now + 120}),
            "recvonly",
            "not yet valid (nbf)",
        ),
        (
            json!({"channel_id": "other", "exp": now + 60}),
            "recvonly",
            "its channel_id is not this connect's",
        ),
        (
            json!({"channel_id": "jwt", "exp": now + 60, "role": "recvonly"}),
            "sendrecv",
            "its role does not allow sendrecv",
        ),
    ] {
        let t = token(claims);
        match Client::connect(&with_token(&t, role)).await {
            Err(hato::client::ClientError::Refused { code: 4490, reason }) => {
                assert_eq!(reason, format!("ACCESS-TOKEN-INVALID: {want}"));
                assert!(!reason.contains(&t[..20]));
            }
            other => panic!("{want}: {:?}", other.map(|_| "connected")),
        }
    }
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"channel_id": "jwt", "exp": now + 60}),
        &EncodingKey::from_secret(b"someone else's secret of 32 bytes!"),
    )
    .unwrap();
    match Client::connect(&with_token(&forged, "recvonly")).await {
        Err(hato::client::ClientError::Refused { code: 4490, reason }) => {
            assert_eq!(
                reason,
                "ACCESS-TOKEN-INVALID: the signature does not check out"
            )
        }
        other => panic!("{:?}", other.map(|_| "connected")),
    }
    assert!(
        asked.lock().unwrap().is_empty(),
        "no token check asked the webhook"
    );
    // Without a token the webhook still decides.
    let _plain = connected(&opts(&s, "jwt", "recvonly")).await;
    assert_eq!(asked.lock().unwrap().len(), 1);
}

/// Node "b" of `a`'s cluster, naming its signaling URL, once `a` knows
/// where to send clients to it.
async fn node_b_with_url(nats: &Nats, a: &Server) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = node_with(nats, "b", |c| {
        c.signaling_addr = format!("127.0.0.1:{port}").parse().unwrap();
        c.public_signaling_url = Some(format!("ws://127.0.0.1:{port}/signaling"));
    })
    .await;
    knows_nodes(a, &["b"]).await;
    knows_nodes(&b, &["a"]).await;
    let cluster = a.shared.cluster.as_ref().unwrap();
    let until = tokio::time::Instant::now() + T;
    while cluster.redirect_target(None).is_none() {
        assert!(tokio::time::Instant::now() < until, "A knows B's URL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b
}

/// Draining (issue 24): a node told to drain answers `/.ok` with 503,
/// redirects a new connect to the other node (the client follows, as the
/// SDKs do), keeps its own peers receiving pushes sent to either node, and
/// ends them with SHUTDOWN at the drain timeout. Alone, it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_redirects_new_connects_and_keeps_its_peers_until_the_timeout() {
    let nats = Nats::start().await;
    let a = node_with(&nats, "a", |c| c.drain_timeout = 3).await;
    let b = node_b_with_url(&nats, &a).await;
    let mut stays = connected(&opts(&a, "dr", "recvonly")).await;

    let (status, answer) = api(&a, "Hato_20261201.Drain", "").await;
    assert_eq!(
        (status, &answer["draining"]),
        (200, &json!(true)),
        "{answer}"
    );
    assert_eq!(
        get(&a.api_addr.to_string(), "/.ok").await,
        (503, r#"{"status":"draining"}"#.into())
    );
    // A learns where B is from B's heartbeats.
    let mut moved = connected(&opts(&a, "dr", "recvonly")).await;
    assert_eq!(
        (a.table().len(), b.table().len()),
        (1, 1),
        "redirected to B"
    );

    // Pushes through either node reach both peers.
    for (via, n) in [(&a, 1), (&b, 2)] {
        push(
            via,
            "Sora_20160711.PushChannel",
            json!({"channel_id": "dr", "data": {"n": n}}),
        )
        .await;
        for peer in [&mut stays, &mut moved] {
            assert_eq!(next_push(peer).await.expect("pushed").0["data"]["n"], n);
        }
    }
    // At the drain timeout A's own peer is ended, with a reason.
    let ev = stays
        .wait_for(T, |e| matches!(e, ClientEvent::WebSocketClosed { .. }))
        .await;
    assert!(
        matches!(&ev, Some(ClientEvent::WebSocketClosed { reason, .. }) if reason == "SHUTDOWN"),
        "{ev:?}"
    );
    still_served(&b, &mut moved, "dr").await;

    // A node alone has nowhere to send a connect: it refuses.
    let alone = server().await;
    assert!(alone.shared.drain());
    match Client::connect(&opts(&alone, "dr", "recvonly")).await {
        Err(hato::client::ClientError::Refused { code: 4490, reason }) => {
            assert_eq!(reason, "DRAINING: this node takes no new connections")
        }
        other => panic!("{:?}", other.map(|_| "connected")),
    }
}

/// `--redirect-when-above`: a node holding that many connections sends a
/// new connect to a node with fewer; one that was redirected already stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_redirects_to_a_less_loaded_one() {
    let nats = Nats::start().await;
    let a = node_with(&nats, "a", |c| c.redirect_when_above = 1).await;
    let b = node_b_with_url(&nats, &a).await;
    let _first = connected(&opts(&a, "full", "recvonly")).await;
    assert_eq!((a.table().len(), b.table().len()), (1, 0));
    let _second = connected(&opts(&a, "full", "recvonly")).await;
    assert_eq!((a.table().len(), b.table().len()), (1, 1), "sent to B");
    // A connect that says it was redirected is not sent on again.
    let mut o = opts(&a, "full", "recvonly");
    o.extra.insert("redirect".into(), json!(true));
    let _third = connected(&o).await;
    assert_eq!((a.table().len(), b.table().len()), (2, 1));
}

/// Access tokens signed with a private key: the old and the new public
/// key both check out while they are rotated; another key does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_signed_with_either_rotated_key_connect() {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let dir = std::env::temp_dir().join(format!("hato-jwt-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (old, new) = (
        rcgen::KeyPair::generate().unwrap(),
        rcgen::KeyPair::generate().unwrap(),
    );
    let keys = dir.join("keys.pem");
    std::fs::write(
        &keys,
        format!("{}{}", old.public_key_pem(), new.public_key_pem()),
    )
    .unwrap();
    let s = server_with(|c| c.auth_jwt_public_key_file = vec![keys.clone()]).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let signed = |key: &rcgen::KeyPair| {
        encode(
            &Header::new(Algorithm::ES256),
            &json!({"channel_id": "rot", "exp": exp}),
            &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap()
    };
    let with = |t: String| {
        let mut o = opts(&s, "rot", "recvonly");
        o.extra
            .insert("metadata".into(), json!({"access_token": t}));
        o
    };
    let _a = connected(&with(signed(&old))).await;
    let _b = connected(&with(signed(&new))).await;
    match Client::connect(&with(signed(&rcgen::KeyPair::generate().unwrap()))).await {
        Err(hato::client::ClientError::Refused { code: 4490, reason }) => {
            assert_eq!(
                reason,
                "ACCESS-TOKEN-INVALID: the signature does not check out"
            )
        }
        other => panic!("{:?}", other.map(|_| "connected")),
    }
    // No token and no webhook: refused.
    match Client::connect(&opts(&s, "rot", "recvonly")).await {
        Err(hato::client::ClientError::Refused { code: 4490, reason }) => {
            assert!(reason.starts_with("ACCESS-TOKEN-MISSING"), "{reason}")
        }
        other => panic!("{:?}", other.map(|_| "connected")),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// docs/grafana/hato.json parses, and every metric its queries name is one
/// a live hato exports (a cluster node with both webhooks, so that every
/// family is there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_hato_exports() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/grafana/hato.json"
        ))
        .unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    let nats = Nats::start().await;
    let (hook, _) = auth_webhook().await;
    let s = node_with(&nats, "grafana", |c| {
        c.auth_webhook_url = Some(hook.clone());
        c.event_webhook_url = Some(hook.clone());
    })
    .await;
    let until = tokio::time::Instant::now() + T;
    while !s.shared.cluster.as_ref().unwrap().available() {
        assert!(tokio::time::Instant::now() < until, "NATS connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Labelled families appear once something is counted in them: a
    // connect (webhook asked), a push, a disconnect.
    let peer = connected(&opts(&s, "grafana", "recvonly")).await;
    push(
        &s,
        "Sora_20160711.PushChannel",
        json!({"channel_id": "grafana", "data": {}}),
    )
    .await;
    peer.send_ws(r#"{"type":"disconnect","reason":"NO-ERROR"}"#);
    table_len(&s, 0).await;
    // And a connect refused before its offer.
    let (code, _) = refused(&s, vec![Message::text("{not json")]).await;
    assert_eq!(code, 4490);
    let (status, text) = get(&s.metrics_addr.unwrap().to_string(), "/metrics").await;
    assert_eq!(status, 200);
    // Family names as `# TYPE` declares them; samples add these suffixes.
    let families: std::collections::HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut checked = 0;
    for expr in &exprs {
        for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !(word.starts_with("hato_") || word.starts_with("process_")) {
                continue;
            }
            let family = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .filter(|f| families.contains(f))
                .unwrap_or(word);
            assert!(
                families.contains(family),
                "{word} (in {expr}) is not exported"
            );
            checked += 1;
        }
    }
    assert!(checked >= exprs.len(), "every query names a metric");
}
