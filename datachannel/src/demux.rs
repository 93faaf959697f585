//! Which peer a datagram on a shared socket belongs to.
//!
//! A known source address routes at once. A new one must first prove
//! itself: a STUN Binding request whose `USERNAME` starts with a ufrag this
//! shard chose and whose `MESSAGE-INTEGRITY` checks out with that peer's
//! password binds the address to the peer. A STUN response from an address
//! this shard sent a check to goes to the peer that sent it (the ICE agent
//! matches its transaction). Neither proves that whoever sent it receives
//! there: a source address can be forged, and a peer knows its own
//! password. So checks to an address are paced until the peer's ICE agent
//! has had an answer from it to one of its checks ([`Proof`],
//! [`Demux::answered`]). Everything else is dropped and counted: after
//! ICE has selected a pair, the core passes every non-STUN datagram up
//! without looking at its source, so this is the only guard.

use crate::shard::PeerId;
use rtc::stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_USERNAME};
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{is_stun_message, Message, CLASS_REQUEST, METHOD_BINDING};
use std::collections::HashMap;
use std::net::SocketAddr;

/// What a peer's checks to an address may rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// It answered one of the peer's checks: whoever asked receives there.
    Answered,
    /// The first address the peer's signed Binding requests came from,
    /// taken as its own until it answers: an honest peer's first check
    /// comes from where it receives, and hato's checks back to it go at
    /// ICE's own pace (a peer that forged it gets them at one address).
    Own,
    /// Another address the peer's signed requests came from (or were
    /// forged to look so: the peer knows its own password).
    Bound,
    /// Only named (a candidate), or nothing at all.
    Unknown,
}

/// Where a datagram goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Peer(PeerId),
    /// No peer: drop it (`integrity`: it named a peer but failed the check).
    Drop {
        integrity: bool,
    },
    /// A Binding request from an address bound to a live peer, naming
    /// another peer: dropped (see [`Demux::route`]).
    Spoofed,
    /// A Binding request with the right password from a new address of a
    /// peer that already has [`MAX_ADDRESSES`]: dropped.
    OverAddresses,
}

/// Source addresses one peer may bind. Each becomes a peer-reflexive
/// candidate in its ICE agent — a candidate, a pair, checks to it, and a
/// linear search through them for every STUN message — so a peer that
/// signs Binding requests from every port of its host (or from forged
/// addresses) would grow them without bound for as long as it lives. A
/// browser uses one or two (a few with several networks); the trickled
/// candidates hato checks are bounded apart (`--max-remote-candidates`).
pub const MAX_ADDRESSES: usize = 32;

#[derive(Default)]
pub struct Demux {
    by_ufrag: HashMap<String, (PeerId, String)>,
    /// Bound addresses, and what each has proven (`Answered`, `Own` or
    /// `Bound`).
    by_addr: HashMap<SocketAddr, (PeerId, Proof)>,
    /// Addresses a peer sent to that are not bound yet: STUN from them
    /// (responses to its checks) goes to that peer; what each has proven
    /// (`Unknown` or `Answered`).
    probes: HashMap<SocketAddr, (PeerId, Proof)>,
    /// How many addresses each peer has bound (at most [`MAX_ADDRESSES`]).
    bound: HashMap<PeerId, usize>,
}

impl Demux {
    pub fn has_ufrag(&self, ufrag: &str) -> bool {
        self.by_ufrag.contains_key(ufrag)
    }

    pub fn add_peer(&mut self, id: PeerId, ufrag: String, pwd: String) {
        self.by_ufrag.insert(ufrag, (id, pwd));
    }

    /// Forgets a peer: its ufrag and every address bound or probed for it.
    pub fn remove_peer(&mut self, id: PeerId, ufrag: &str) {
        self.by_ufrag.remove(ufrag);
        self.by_addr.retain(|_, p| p.0 != id);
        self.probes.retain(|_, p| p.0 != id);
        self.bound.remove(&id);
    }

    /// Peer `id` sends to `to`: its STUN answers may come back from there.
    /// Returns what is known of `to` (checks to an address that has not
    /// answered are paced by the caller).
    pub fn sent(&mut self, id: PeerId, to: SocketAddr) -> Proof {
        if let Some(&(_, proof)) = self.by_addr.get(&to) {
            return proof;
        }
        let probe = self.probes.entry(to).or_insert((id, Proof::Unknown));
        probe.0 = id;
        probe.1
    }

    /// `to` answered a check: its peer's ICE agent matched a success
    /// response from there to a check it sent (a transaction only whoever
    /// receives at `to` can know).
    pub fn answered(&mut self, to: SocketAddr) {
        if let Some(entry) = self.by_addr.get_mut(&to).or(self.probes.get_mut(&to)) {
            entry.1 = Proof::Answered;
        }
    }

    /// The peer (and its password) whose ufrag starts a STUN `USERNAME`
    /// (`<our ufrag>:<their ufrag>`).
    fn named(&self, username: &[u8]) -> Option<&(PeerId, String)> {
        let ufrag = username.split(|b| *b == b':').next()?;
        self.by_ufrag.get(std::str::from_utf8(ufrag).ok()?)
    }

    /// Peer `id`'s password, if a STUN `USERNAME` names it.
    pub fn password_named(&self, id: PeerId, username: &[u8]) -> Option<&str> {
        self.named(username)
            .filter(|(peer, _)| *peer == id)
            .map(|(_, pwd)| pwd.as_str())
    }

    /// Whether a datagram could be anyone's, judged without decoding or
    /// allocating: it comes from a bound or probed address, or it is STUN
    /// other than a Binding request naming no peer. What is not is junk,
    /// dropped before it leaves the receive buffer; the rest goes through
    /// [`Demux::route`]. `naming` lists the addresses whose Binding request
    /// named a peer earlier in the same receive batch (not bound yet):
    /// what follows from them is kept too, and an address is added.
    pub fn may_route(&self, from: &SocketAddr, data: &[u8], naming: &mut Vec<SocketAddr>) -> bool {
        if self.by_addr.contains_key(from) || self.probes.contains_key(from) {
            return true;
        }
        if !is_stun_message(data) {
            return naming.contains(from);
        }
        if !is_binding_request(data) {
            return true;
        }
        let names = stun_username(data).and_then(|u| self.named(u)).is_some();
        if names && naming.len() < 64 && !naming.contains(from) {
            naming.push(*from);
        }
        names
    }

    pub fn route(
        &mut self,
        from: SocketAddr,
        data: &[u8],
        crypto: &dyn rtc::crypto::RTCCrypto,
    ) -> Route {
        if let Some(&(id, _)) = self.by_addr.get(&from) {
            // A bound address stays its peer's for as long as that peer
            // lives: a Binding request naming another peer is dropped, even
            // with that peer's password — a peer that forges its source
            // address would otherwise take a live peer's address and cut it
            // off. (A new client on a reused port is bound once the old
            // peer's session ends, within its ICE consent timeout.) The
            // request naming this address's own peer goes there without a
            // second parse: its ICE agent checks MESSAGE-INTEGRITY itself.
            if is_stun_message(data) && is_binding_request(data) {
                let own = stun_username(data)
                    .and_then(|u| self.named(u))
                    .is_none_or(|(peer, _)| *peer == id);
                if !own {
                    return Route::Spoofed;
                }
            }
            return Route::Peer(id);
        }
        if !is_stun_message(data) {
            return Route::Drop { integrity: false };
        }
        // Junk from anywhere is mostly requests naming nobody: found out
        // by walking the attributes, before any decoding or allocation.
        if is_binding_request(data) && stun_username(data).and_then(|u| self.named(u)).is_none() {
            return Route::Drop { integrity: false };
        }
        let mut m = Message::new();
        if m.unmarshal_binary(data).is_err() {
            return Route::Drop { integrity: false };
        }
        if m.typ.class != CLASS_REQUEST || m.typ.method != METHOD_BINDING {
            // A response or an indication: its own peer's agent checks it.
            return match self.probes.get(&from) {
                Some(probe) => Route::Peer(probe.0),
                None => Route::Drop { integrity: false },
            };
        }
        let Ok(username) = m.get(ATTR_USERNAME) else {
            return Route::Drop { integrity: false };
        };
        let Some((id, pwd)) = self.named(&username) else {
            return Route::Drop { integrity: false };
        };
        let id = *id;
        if !m.contains(ATTR_MESSAGE_INTEGRITY)
            || MessageIntegrity::check(&mut m, pwd.as_bytes(), crypto).is_err()
        {
            return Route::Drop { integrity: true };
        }
        // Not bound (the bound ones returned above): a new address.
        let bound = self.bound.entry(id).or_default();
        if *bound >= MAX_ADDRESSES {
            return Route::OverAddresses;
        }
        let proof = if *bound == 0 {
            Proof::Own
        } else {
            Proof::Bound
        };
        *bound += 1;
        self.by_addr.insert(from, (id, proof));
        self.probes.remove(&from);
        tracing::trace!(%from, peer = id, "address bound");
        Route::Peer(id)
    }
}

/// A STUN Binding request (class request, method Binding): type 0x0001.
fn is_binding_request(data: &[u8]) -> bool {
    data.len() >= 2 && data[0] == 0 && data[1] == 1
}

/// The value of a STUN message's `USERNAME`, found by walking its
/// attributes without decoding them.
fn stun_username(data: &[u8]) -> Option<&[u8]> {
    let len = u16::from_be_bytes([*data.get(2)?, *data.get(3)?]) as usize;
    let body = data.get(20..20 + len)?;
    let mut i = 0;
    while let Some(h) = body.get(i..i + 4) {
        let typ = u16::from_be_bytes([h[0], h[1]]);
        let n = u16::from_be_bytes([h[2], h[3]]) as usize;
        let value = body.get(i + 4..i + 4 + n)?;
        if typ == ATTR_USERNAME.value() {
            return Some(value);
        }
        i += 4 + n.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consent::signed_binding_request as request;
    use rtc::stun::message::TransactionId;

    #[test]
    fn a_new_address_is_bound_only_by_a_request_with_the_peers_password() {
        let crypto = rtc::crypto::default_provider().unwrap();
        let c = crypto.crypto();
        let mut d = Demux::default();
        d.add_peer(7, "ours".into(), "secret".into());
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        assert_eq!(
            d.route(a, b"\x17\xfe\xfd junk", c),
            Route::Drop { integrity: false }
        );
        assert_eq!(
            d.route(a, &request("nobody:x", "secret"), c),
            Route::Drop { integrity: false }
        );
        assert_eq!(
            d.route(a, &request("ours:x", "wrong"), c),
            Route::Drop { integrity: true }
        );
        assert_eq!(
            d.route(a, b"\x17\xfe\xfd junk", c),
            Route::Drop { integrity: false }
        );
        // Judged in the receive buffer: junk, until a request names a
        // peer (then what follows it in the batch goes to `route` too).
        let mut naming = Vec::new();
        assert!(!d.may_route(&a, b"\x17\xfe\xfd junk", &mut naming));
        assert!(!d.may_route(&a, &request("nobody:x", "secret"), &mut naming));
        assert!(d.may_route(&a, &request("ours:x", "wrong"), &mut naming));
        assert!(d.may_route(&a, b"\x17\xfe\xfd junk", &mut naming));
        assert!(!d.may_route(&a, b"\x17\xfe\xfd junk", &mut Vec::new()));
        assert_eq!(d.route(a, &request("ours:x", "secret"), c), Route::Peer(7));
        assert_eq!(d.route(a, b"\x17\xfe\xfd data", c), Route::Peer(7));
        assert!(d.may_route(&a, b"\x17\xfe\xfd data", &mut Vec::new()));
        // Bound: a request naming its own peer goes there unchecked (the
        // peer's agent checks it); one naming another live peer never
        // moves the address, even with that peer's password.
        d.add_peer(8, "theirs".into(), "other".into());
        assert_eq!(d.route(a, &request("ours:x", "wrong"), c), Route::Peer(7));
        assert_eq!(d.route(a, &request("theirs:x", "other"), c), Route::Spoofed);
        assert_eq!(d.route(a, b"\x17\xfe\xfd data", c), Route::Peer(7));
        // Once its peer is gone, the address is free for another.
        d.remove_peer(7, "ours");
        assert_eq!(
            d.route(a, b"\x17\xfe\xfd data", c),
            Route::Drop { integrity: false }
        );
        assert_eq!(d.route(a, &request("theirs:x", "other"), c), Route::Peer(8));
        assert_eq!(d.route(a, b"\x17\xfe\xfd data", c), Route::Peer(8));
    }

    #[test]
    fn a_peer_binds_at_most_max_addresses() {
        let crypto = rtc::crypto::default_provider().unwrap();
        let c = crypto.crypto();
        let mut d = Demux::default();
        d.add_peer(7, "ours".into(), "secret".into());
        d.add_peer(8, "theirs".into(), "other".into());
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        for port in 0..MAX_ADDRESSES as u16 {
            let r = d.route(addr(1000 + port), &request("ours:x", "secret"), c);
            assert_eq!(r, Route::Peer(7), "address {port}");
        }
        let one_more = addr(2000);
        let r = d.route(one_more, &request("ours:x", "secret"), c);
        assert_eq!(r, Route::OverAddresses);
        assert_eq!(
            d.route(one_more, b"\x17\xfe\xfd data", c),
            Route::Drop { integrity: false }
        );
        // Those bound still route; another peer is not affected; and once
        // the peer is gone its count goes with it.
        assert_eq!(d.route(addr(1000), b"\x17\xfe\xfd data", c), Route::Peer(7));
        assert_eq!(
            d.route(one_more, &request("theirs:x", "other"), c),
            Route::Peer(8)
        );
        d.remove_peer(7, "ours");
        d.add_peer(9, "ours".into(), "secret".into());
        assert_eq!(
            d.route(addr(1000), &request("ours:x", "secret"), c),
            Route::Peer(9)
        );
    }

    /// Neither a signed request nor a response from an address proves that
    /// whoever sent it receives there (the source may be forged, and a
    /// peer knows its own password): only its agent's word does, and the
    /// peer's first address is taken as its own meanwhile.
    #[test]
    fn an_address_has_answered_only_when_its_agent_says_so() {
        let crypto = rtc::crypto::default_provider().unwrap();
        let c = crypto.crypto();
        let mut d = Demux::default();
        d.add_peer(7, "ours".into(), "secret".into());
        let third: SocketAddr = "198.51.100.9:9".parse().unwrap();
        let peer: SocketAddr = "198.51.100.10:9".parse().unwrap();
        assert_eq!(d.sent(7, third), Proof::Unknown);
        // A Binding success response from there goes to the peer's agent,
        // and proves nothing by itself.
        let mut m = Message::new();
        m.build(&[
            Box::new(rtc::stun::message::BINDING_SUCCESS),
            Box::new(TransactionId::new()),
        ])
        .unwrap();
        assert_eq!(d.route(third, &m.raw, c), Route::Peer(7));
        assert_eq!(d.sent(7, third), Proof::Unknown);
        d.answered(third);
        assert_eq!(d.sent(7, third), Proof::Answered);
        // A signed request binds the address: the peer's first is taken
        // as its own; another proves nothing.
        assert_eq!(d.sent(7, peer), Proof::Unknown);
        assert_eq!(
            d.route(peer, &request("ours:x", "secret"), c),
            Route::Peer(7)
        );
        assert_eq!(d.sent(7, peer), Proof::Own);
        let other: SocketAddr = "198.51.100.11:9".parse().unwrap();
        assert_eq!(
            d.route(other, &request("ours:x", "secret"), c),
            Route::Peer(7)
        );
        assert_eq!(d.sent(7, other), Proof::Bound);
        d.answered(other);
        assert_eq!(d.sent(7, other), Proof::Answered);
    }

    #[test]
    fn the_username_is_found_among_other_attributes() {
        let raw = request("ours:theirs", "secret");
        assert_eq!(stun_username(&raw), Some(&b"ours:theirs"[..]));
        assert!(is_binding_request(&raw));
        assert_eq!(stun_username(&raw[..raw.len() - 30]), None);
        assert_eq!(stun_username(b"\x00\x01"), None);
    }
}
