//! Answers to a connected peer's consent checks, without the core.
//!
//! A browser checks the selected pair every 2.5 s for as long as it is
//! connected (RFC 7675 consent freshness; hato-load's peers every 2 s): on
//! an idle server that is most of the datagrams, and each one, through the
//! core, was a STUN decode, string building, an HMAC key schedule, a
//! response encoded attribute by attribute and a pass over every handler
//! of the peer's pipeline. A server shard answers the ordinary case here
//! instead: a Binding request from the controlled peer, on the pair ICE
//! selected, whose `MESSAGE-INTEGRITY` checks with the peer's password. The
//! response is what the core sends (`XOR-MAPPED-ADDRESS`,
//! `MESSAGE-INTEGRITY`, `FINGERPRINT`), and the core's ICE agent is told
//! (`answered_check_on_selected`), so that consent, keep-alive and failure
//! detection see the check as before. Anything else — a nomination, a
//! role conflict, another pair, an attribute this module does not know —
//! goes to the core as before.

use bytes::{BufMut, BytesMut};
use rtc::crypto::{HmacAlgorithm, RTCCrypto};
use rtc::stun::attributes::{
    ATTR_FINGERPRINT, ATTR_ICE_CONTROLLED, ATTR_ICE_CONTROLLING, ATTR_MESSAGE_INTEGRITY,
    ATTR_PRIORITY, ATTR_USERNAME, ATTR_XORMAPPED_ADDRESS,
};
use rtc::stun::fingerprint::fingerprint_value;
use rtc::stun::message::{
    BINDING_REQUEST, BINDING_SUCCESS, MAGIC_COOKIE as COOKIE, MESSAGE_HEADER_SIZE as HEADER,
};
use std::net::SocketAddr;

const INTEGRITY: usize = 20;
/// The longest answer: to an IPv6 address.
pub const ANSWER_MAX: usize = HEADER + 24 + 4 + INTEGRITY + 8;

/// A Binding request fit to be answered outside the core.
#[derive(Debug)]
pub struct Check<'a> {
    pub username: &'a [u8],
    data: &'a [u8],
    /// Where MESSAGE-INTEGRITY starts, and its value.
    integrity: (usize, &'a [u8]),
}

/// `data` as a consent check: a Binding request whose attributes are
/// `USERNAME`, `PRIORITY`, `ICE-CONTROLLED`, and optionally
/// `NETWORK-COST`/`GOOG-*` and other comprehension-optional ones, in any
/// order, then `MESSAGE-INTEGRITY` and optionally a matching
/// `FINGERPRINT`. `None` for anything else: the core then judges it as it
/// always did. Nothing is authenticated yet: see [`Check::verify`].
pub fn parse(data: &[u8]) -> Option<Check<'_>> {
    let word = |i: usize| data.get(i..i + 2).map(|w| u16::from_be_bytes([w[0], w[1]]));
    if data.len() < HEADER
        || word(0)? != BINDING_REQUEST.value()
        || data[4..8] != COOKIE.to_be_bytes()
        || usize::from(word(2)?) + HEADER != data.len()
    {
        return None;
    }
    let (mut username, mut priority, mut controlled, mut integrity) = (None, false, false, None);
    let mut i = HEADER;
    while i < data.len() {
        let (typ, len) = (word(i)?, usize::from(word(i + 2)?));
        let value = data.get(i + 4..i + 4 + len)?;
        if integrity.is_some() {
            // Only a FINGERPRINT may follow MESSAGE-INTEGRITY; it ends the
            // message and must match it (RFC 8489 §14.7), though the
            // integrity does not cover it.
            if typ != ATTR_FINGERPRINT.value()
                || len != 4
                || i + 8 != data.len()
                || value != fingerprint_value(&data[..i]).to_be_bytes()
            {
                return None;
            }
            break;
        }
        match typ {
            t if t == ATTR_USERNAME.value() => username = Some(value),
            t if t == ATTR_PRIORITY.value() && len == 4 => priority = true,
            t if t == ATTR_ICE_CONTROLLED.value() && len == 8 => controlled = true,
            t if t == ATTR_MESSAGE_INTEGRITY.value() && len == INTEGRITY => {
                integrity = Some((i, value))
            }
            // ICE-CONTROLLING (a role conflict), USE-CANDIDATE, and any
            // other comprehension-required attribute: the core's business.
            t if t == ATTR_ICE_CONTROLLING.value() || t < 0x8000 => return None,
            _ => {}
        }
        i += 4 + len.div_ceil(4) * 4;
    }
    if !priority || !controlled {
        return None;
    }
    Some(Check {
        username: username?,
        data,
        integrity: integrity?,
    })
}

impl Check<'_> {
    /// Whether its `MESSAGE-INTEGRITY` checks with `pwd` (constant time).
    pub fn verify(&self, pwd: &[u8], crypto: &dyn RTCCrypto) -> bool {
        // The HMAC covers the message up to MESSAGE-INTEGRITY, with the
        // length in the header counting up to and including it.
        let (at, tag) = self.integrity;
        let length = ((at + 4 + INTEGRITY - HEADER) as u16).to_be_bytes();
        let data = self.data;
        crypto
            .new_hmac(HmacAlgorithm::Sha1, pwd)
            .and_then(|mut mac| mac.verify(&[&data[..2], &length, &data[4..at]], tag))
            .is_ok()
    }

    fn transaction(&self) -> &[u8] {
        &self.data[8..HEADER]
    }
}

/// Appends to `out` the success response to `check`, from `from`, as the
/// core builds it: `XOR-MAPPED-ADDRESS`, `MESSAGE-INTEGRITY` with `pwd`,
/// `FINGERPRINT`.
pub fn answer(
    check: &Check<'_>,
    from: SocketAddr,
    pwd: &[u8],
    crypto: &dyn RTCCrypto,
    out: &mut BytesMut,
) -> Option<()> {
    let start = out.len();
    out.put_u16(BINDING_SUCCESS.value());
    out.put_u16(0);
    out.put_u32(COOKIE);
    out.put_slice(check.transaction());
    out.put_u16(ATTR_XORMAPPED_ADDRESS.value());
    let port = from.port() ^ (COOKIE >> 16) as u16;
    match from {
        SocketAddr::V4(a) => {
            out.put_u16(8);
            out.put_u16(0x0001);
            out.put_u16(port);
            out.put_u32(u32::from(*a.ip()) ^ COOKIE);
        }
        SocketAddr::V6(a) => {
            out.put_u16(20);
            out.put_u16(0x0002);
            out.put_u16(port);
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&COOKIE.to_be_bytes());
            key[4..].copy_from_slice(check.transaction());
            let ip = a.ip().octets();
            out.extend(ip.iter().zip(key).map(|(b, k)| b ^ k));
        }
    }
    let set_length = |out: &mut BytesMut, end: usize| {
        let n = (end - start - HEADER) as u16;
        out[start + 2..start + 4].copy_from_slice(&n.to_be_bytes());
    };
    set_length(out, out.len() + 4 + INTEGRITY);
    let mut tag = [0u8; INTEGRITY];
    let mut mac = crypto.new_hmac(HmacAlgorithm::Sha1, pwd).ok()?;
    mac.sign(&[&out[start..]], &mut tag).ok()?;
    out.put_u16(ATTR_MESSAGE_INTEGRITY.value());
    out.put_u16(INTEGRITY as u16);
    out.put_slice(&tag);
    set_length(out, out.len() + 8);
    let fingerprint = fingerprint_value(&out[start..]);
    out.put_u16(ATTR_FINGERPRINT.value());
    out.put_u16(4);
    out.put_u32(fingerprint);
    Some(())
}

/// A Binding request signed as a peer's ICE agent signs it: `USERNAME`,
/// then `MESSAGE-INTEGRITY` with `pwd`. For the tests and the attack suite,
/// which play a peer (or one who learnt its password) towards a server.
pub fn signed_binding_request(username: &str, pwd: &str) -> Vec<u8> {
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{Message, TransactionId};
    use rtc::stun::textattrs::TextAttribute;
    let provider = rtc::crypto::default_provider().expect("a crypto provider");
    let mut m = Message::new();
    m.build(&[
        Box::new(BINDING_REQUEST),
        Box::new(TransactionId::new()),
        Box::new(TextAttribute::new(ATTR_USERNAME, username.into())),
        Box::new(MessageIntegrity::new_short_term_integrity_with_provider(
            pwd.into(),
            provider.crypto(),
        )),
    ])
    .expect("a Binding request");
    m.raw
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::stun::attributes::ATTR_USE_CANDIDATE;
    use rtc::stun::fingerprint::FINGERPRINT;
    use rtc::stun::integrity::MessageIntegrity;
    use rtc::stun::message::{Getter, Message, Setter, TransactionId};
    use rtc::stun::textattrs::TextAttribute;
    use rtc::stun::xoraddr::XorMappedAddress;

    const PWD: &str = "aaaabbbbccccddddeeeeffffgggghhhh";

    /// A request as an agent encodes it, with `extra` attributes after the
    /// username.
    fn request(extra: &[(rtc::stun::attributes::AttrType, &[u8])], pwd: &str) -> Vec<u8> {
        let crypto = rtc::crypto::default_provider().unwrap();
        let mut m = Message::new();
        m.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(TransactionId::new()),
            Box::new(TextAttribute::new(ATTR_USERNAME, "server:client".into())),
        ])
        .unwrap();
        for (t, v) in extra {
            m.add(*t, v);
        }
        MessageIntegrity::new_short_term_integrity_with_provider(pwd.into(), crypto.crypto())
            .add_to(&mut m)
            .unwrap();
        FINGERPRINT.add_to(&mut m).unwrap();
        m.raw
    }

    fn check_attrs() -> Vec<(rtc::stun::attributes::AttrType, &'static [u8])> {
        vec![
            (ATTR_PRIORITY, &[0x6e, 0, 0x1e, 0xff]),
            (ATTR_ICE_CONTROLLED, &[1, 2, 3, 4, 5, 6, 7, 8]),
        ]
    }

    #[test]
    fn a_consent_check_is_answered_as_the_agent_would_and_the_answer_verifies() {
        let provider = rtc::crypto::default_provider().unwrap();
        let crypto = provider.crypto();
        let data = request(&check_attrs(), PWD);
        let check = parse(&data).expect("a consent check");
        assert!(check.verify(PWD.as_bytes(), crypto));
        assert_eq!(check.username, b"server:client");
        for from in ["192.0.2.7:50123", "[2001:db8::5]:443"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut out = BytesMut::from(&b"before"[..]);
            answer(&check, from, PWD.as_bytes(), crypto, &mut out).unwrap();
            assert!(out.len() - 6 <= ANSWER_MAX);
            assert_eq!(&out[..6], b"before", "appended");
            // Decoded and checked by the STUN library, as a peer would.
            let mut m = Message::new();
            m.unmarshal_binary(&out[6..]).unwrap();
            assert_eq!(m.typ.class, rtc::stun::message::CLASS_SUCCESS_RESPONSE);
            assert_eq!(m.transaction_id.0[..], data[8..20]);
            MessageIntegrity::check(&mut m, PWD.as_bytes(), crypto).expect("integrity");
            FINGERPRINT.check(&m).expect("fingerprint");
            let mut mapped = XorMappedAddress::default();
            mapped.get_from(&m).unwrap();
            assert_eq!(SocketAddr::new(mapped.ip, mapped.port), from);
        }
    }

    #[test]
    fn anything_but_an_authenticated_plain_check_is_left_to_the_core() {
        let provider = rtc::crypto::default_provider().unwrap();
        let crypto = provider.crypto();
        let pwd = PWD.as_bytes();
        let ok = |data: &[u8]| parse(data).is_some_and(|c| c.verify(pwd, crypto));
        assert!(ok(&request(&check_attrs(), PWD)));
        assert!(!ok(&request(&check_attrs(), "another password")));
        let mut attrs = check_attrs();
        attrs.push((ATTR_USE_CANDIDATE, &[]));
        assert!(parse(&request(&attrs, PWD)).is_none(), "nomination");
        let mut attrs = check_attrs();
        attrs[1] = (ATTR_ICE_CONTROLLING, &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(parse(&request(&attrs, PWD)).is_none(), "role conflict");
        assert!(
            parse(&request(&check_attrs()[..1], PWD)).is_none(),
            "no role"
        );
        // A comprehension-optional attribute (GOOG-NETWORK-INFO) is fine.
        let mut attrs = check_attrs();
        attrs.push((rtc::stun::attributes::AttrType(0xC057), &[0, 1, 0, 10]));
        assert!(ok(&request(&attrs, PWD)));
        // Tampered after signing, truncated, or padded: never.
        let good = request(&check_attrs(), PWD);
        for i in [1, 9, 30, good.len() - 30, good.len() - 1] {
            let mut tampered = good.clone();
            tampered[i] ^= 1;
            assert!(!ok(&tampered), "byte {i} changed");
        }
        for n in [0, 1, 19, 20, 27, good.len() - 1] {
            assert!(parse(&good[..n]).is_none(), "{n} bytes");
        }
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(parse(&longer).is_none());
    }

    /// What a peer sends here is untrusted: mutated, truncated and random
    /// datagrams are parsed and checked without a panic, and none of the
    /// mutated ones authenticates.
    #[test]
    fn mutated_and_random_datagrams_never_panic_nor_pass() {
        use rand::{Rng, SeedableRng};
        let provider = rtc::crypto::default_provider().unwrap();
        let crypto = provider.crypto();
        let good = request(&check_attrs(), PWD);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..20_000 {
            let mut d = if round % 4 == 0 {
                (0..rng.gen_range(0..120)).map(|_| rng.gen()).collect()
            } else {
                good.clone()
            };
            for _ in 0..rng.gen_range(1..4) {
                if let Some(b) = d.get_mut(rng.gen_range(0..good.len())) {
                    *b ^= 1 << rng.gen_range(0..8);
                }
            }
            d.truncate(rng.gen_range(0..=d.len()));
            if let Some(check) = parse(&d) {
                assert!(!check.verify(PWD.as_bytes(), crypto) || d == good);
            }
        }
    }
}
