//! Access tokens checked by hato itself (`--auth-jwt-secret`,
//! `--auth-jwt-public-key-file`; docs/security.md, "Access tokens"): the
//! backend signs a short-lived JWT once, the client sends it as
//! `metadata.access_token`, and a connect with a valid one needs no call
//! to the auth webhook.
//!
//! Checked: the signature (HS256 with the secret; RS256/RS384/RS512 or
//! ES256/ES384 with any of the public keys, so that keys can be rotated),
//! `exp` (required), `nbf`, both with 30 s of leeway, and `channel_id`
//! (required, equal to the connect's). Optional claims: `role` (a role or
//! a list of roles the connect's must be in), `client_id` (pinned),
//! `metadata` (the connection's `authn_metadata`),
//! `signaling_notify_metadata` (what others are shown). A refusal names
//! the check that failed and never echoes the token.

use hato_signaling::Role;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Seconds of clock difference allowed on `exp` and `nbf`.
pub const LEEWAY: u64 = 30;

/// The keys tokens are checked with.
pub struct Keys {
    keys: Vec<(DecodingKey, &'static [Algorithm])>,
}

const HMAC: &[Algorithm] = &[Algorithm::HS256];
const RSA: &[Algorithm] = &[Algorithm::RS256, Algorithm::RS384, Algorithm::RS512];
const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];

#[derive(serde::Deserialize)]
struct Claims {
    channel_id: Option<String>,
    role: Option<Value>,
    client_id: Option<String>,
    metadata: Option<Value>,
    signaling_notify_metadata: Option<Value>,
}

impl Keys {
    /// From the flags; `None` when neither is set.
    pub fn load(
        secret: Option<&str>,
        public_key_files: &[PathBuf],
    ) -> Result<Option<Keys>, String> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            if secret.len() < 32 {
                return Err("--auth-jwt-secret must be at least 32 bytes".into());
            }
            keys.push((DecodingKey::from_secret(secret.as_bytes()), HMAC));
        }
        for path in public_key_files {
            let shown = path.display();
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--auth-jwt-public-key-file {shown}: {e}"))?;
            let before = keys.len();
            // Every PEM block of the file, each a public key.
            for block in text.split("-----BEGIN ").skip(1) {
                let pem = format!("-----BEGIN {block}");
                if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
                    keys.push((k, RSA));
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                    keys.push((k, EC));
                } else {
                    return Err(format!(
                        "--auth-jwt-public-key-file {shown}: a block that is not an RSA or EC public key (PEM)"
                    ));
                }
            }
            if keys.len() == before {
                return Err(format!(
                    "--auth-jwt-public-key-file {shown}: no public key in it"
                ));
            }
        }
        Ok((!keys.is_empty()).then_some(Keys { keys }))
    }

    /// Checks `token` for a connect to `channel_id` as `role`: the auth
    /// webhook overrides it grants, or the reason it is refused.
    pub fn check(
        &self,
        token: &str,
        channel_id: &str,
        role: Role,
    ) -> Result<Map<String, Value>, String> {
        let refuse = |why: &str| format!("ACCESS-TOKEN-INVALID: {why}");
        let header = jsonwebtoken::decode_header(token).map_err(|_| refuse("not a JWT"))?;
        let mut last = refuse("no key for its algorithm");
        let mut claims = None;
        for (key, algorithms) in &self.keys {
            if !algorithms.contains(&header.alg) {
                continue;
            }
            let mut v = Validation::new(header.alg);
            v.leeway = LEEWAY;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp"]);
            match jsonwebtoken::decode::<Claims>(token, key, &v) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::InvalidSignature => refuse("the signature does not check out"),
                        ErrorKind::ExpiredSignature => return Err(refuse("expired (exp)")),
                        ErrorKind::ImmatureSignature => return Err(refuse("not yet valid (nbf)")),
                        ErrorKind::MissingRequiredClaim(c) => {
                            return Err(refuse(&format!("the {c} claim is missing")))
                        }
                        _ => refuse("malformed"),
                    }
                }
            }
        }
        let claims = claims.ok_or(last)?;
        match claims.channel_id.as_deref() {
            Some(c) if c == channel_id => {}
            Some(_) => return Err(refuse("its channel_id is not this connect's")),
            None => return Err(refuse("the channel_id claim is missing")),
        }
        if let Some(allowed) = &claims.role {
            let ok = match allowed {
                Value::String(r) => r == role.as_str(),
                Value::Array(rs) => rs.iter().any(|r| r.as_str() == Some(role.as_str())),
                _ => false,
            };
            if !ok {
                return Err(refuse(&format!(
                    "its role does not allow {}",
                    role.as_str()
                )));
            }
        }
        let mut overrides = Map::new();
        if let Some(id) = claims.client_id {
            overrides.insert("client_id".into(), id.into());
        }
        if let Some(m) = claims.metadata {
            overrides.insert("authn_metadata".into(), m);
        }
        if let Some(m) = claims.signaling_notify_metadata {
            overrides.insert("signaling_notify_metadata".into(), m);
        }
        Ok(overrides)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn each_check_says_what_failed() {
        let keys = Keys::load(Some(SECRET), &[]).unwrap().unwrap();
        let t = now();
        let good = json!({"channel_id": "c", "exp": t + 60, "role": ["recvonly", "sendonly"],
                          "client_id": "u1", "metadata": {"plan": "pro"}});
        let o = keys
            .check(&hs(good.clone(), SECRET), "c", Role::Recvonly)
            .unwrap();
        assert_eq!(o["client_id"], "u1");
        assert_eq!(o["authn_metadata"], json!({"plan": "pro"}));
        let why = |claims: Value, secret: &str, channel: &str, role: Role| {
            keys.check(&hs(claims, secret), channel, role).unwrap_err()
        };
        assert_eq!(
            why(
                json!({"channel_id": "c", "exp": t - 120}),
                SECRET,
                "c",
                Role::Recvonly
            ),
            "ACCESS-TOKEN-INVALID: expired (exp)"
        );
        // Within the leeway it still passes.
        assert!(keys
            .check(
                &hs(json!({"channel_id": "c", "exp": t - 5}), SECRET),
                "c",
                Role::Recvonly
            )
            .is_ok());
        assert_eq!(
            why(
                json!({"channel_id": "c", "exp": t + 60, "nbf": t + 120}),
                SECRET,
                "c",
                Role::Recvonly
            ),
            "ACCESS-TOKEN-INVALID: not yet valid (nbf)"
        );
        assert_eq!(
            why(good.clone(), SECRET, "other", Role::Recvonly),
            "ACCESS-TOKEN-INVALID: its channel_id is not this connect's"
        );
        assert_eq!(
            why(good.clone(), SECRET, "c", Role::Sendrecv),
            "ACCESS-TOKEN-INVALID: its role does not allow sendrecv"
        );
        assert_eq!(
            why(
                good.clone(),
                "another secret of at least 32 bytes",
                "c",
                Role::Recvonly
            ),
            "ACCESS-TOKEN-INVALID: the signature does not check out"
        );
        assert_eq!(
            why(json!({"channel_id": "c"}), SECRET, "c", Role::Recvonly),
            "ACCESS-TOKEN-INVALID: the exp claim is missing"
        );
        assert_eq!(
            keys.check("not.a.token", "c", Role::Recvonly).unwrap_err(),
            "ACCESS-TOKEN-INVALID: not a JWT"
        );
        assert!(Keys::load(Some("short"), &[]).is_err());
    }

    #[test]
    fn any_of_several_public_keys_checks_a_token() {
        let dir = std::env::temp_dir().join(format!("hato-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = rcgen::KeyPair::generate().unwrap();
        let new = rcgen::KeyPair::generate().unwrap();
        let file = dir.join("keys.pem");
        std::fs::write(
            &file,
            format!("{}{}", old.public_key_pem(), new.public_key_pem()),
        )
        .unwrap();
        let keys = Keys::load(None, &[file]).unwrap().unwrap();
        let claims = json!({"channel_id": "c", "exp": now() + 60});
        for key in [&old, &new] {
            let token = encode(
                &Header::new(Algorithm::ES256),
                &claims,
                &EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
            assert!(keys.check(&token, "c", Role::Sendonly).is_ok());
        }
        let stranger = rcgen::KeyPair::generate().unwrap();
        let token = encode(
            &Header::new(Algorithm::ES256),
            &claims,
            &EncodingKey::from_ec_pem(stranger.serialize_pem().as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(
            keys.check(&token, "c", Role::Sendonly).unwrap_err(),
            "ACCESS-TOKEN-INVALID: the signature does not check out"
        );
        // An HS256 token is not checked with a public key.
        assert_eq!(
            keys.check(&hs(claims, SECRET), "c", Role::Sendonly)
                .unwrap_err(),
            "ACCESS-TOKEN-INVALID: no key for its algorithm"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
