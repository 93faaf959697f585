//! One connection's protocol after the offer, as a sans-I/O state machine
//! in the shape of quinn-proto's `Connection`: events and the time go in,
//! [`Action`]s and the next deadline come out. No sockets, no tasks, no
//! clock of its own — `src/session.rs` is the I/O shell that moves bytes
//! between the sockets and this machine, and the tests below drive it with
//! instants they choose.
//!
//! The rules kept here: what each client message means on each transport
//! (§3), the deadlines (answer, then establishment), when to ping and when
//! a pong is late (§3.4), when to register and when to send `switched`
//! (§3.9, §4.4), what a lost WebSocket means in each mode (§3.9, §5.3), and
//! which end gives which close code or close message (§5).

use crate::message::{ClientMessage, SYSTEM_LABELS};
use crate::{sdp, zlib};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The close code Sora uses for a refused `connect` (§5.1).
pub const SIGNALING_ERROR: u16 = 4490;

/// Timeouts and limits the machine applies.
#[derive(Debug, Clone)]
pub struct Rules {
    /// `offer` → `answer`.
    pub answer_timeout: Duration,
    /// `answer` → connected, and with DataChannel signaling → `switched`.
    pub establish_timeout: Duration,
    pub ping_interval: Duration,
    /// No `pong` (on any transport) for this long ends the session.
    pub pong_timeout: Duration,
    /// Largest message taken from a peer, after inflating.
    pub client_message_limit: usize,
    /// Largest push sent over a DataChannel (also capped by the answer's
    /// `a=max-message-size`).
    pub data_channel_message_limit: usize,
    /// Remote candidates a peer may give, trickled and in its answer.
    pub max_candidates: usize,
}

/// The reason's first word when a peer gives more than
/// [`Rules::max_candidates`].
pub const TOO_MANY_CANDIDATES: &str = "TOO-MANY-CANDIDATES";

/// The connection's mode, from `connect` and the server defaults.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub data_channel_signaling: bool,
    pub ignore_disconnect_websocket: bool,
    /// The system DataChannels are zlib-framed.
    pub compress: bool,
    /// `connect` named its `libwebrtc` (a native SDK): an answer without
    /// `a=max-message-size` takes 256 KiB, as libwebrtc's SCTP does, not
    /// RFC 8841's 64 KiB.
    pub libwebrtc: bool,
}

/// Why a session ends, which decides what the peer is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Bad signaling input or a connect-time failure: Close 4490.
    Refused(String),
    /// The client sent `disconnect`.
    ClientDisconnect,
    /// The WebSocket went away while it still mattered.
    WebSocketLost,
    /// ICE/DTLS failed, or the PeerConnection or the association closed.
    PeerFailed(String),
    /// hato ends it: code 1000 with the reason's name.
    Server(Stop),
}

/// Why hato itself ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Its outbox or a DataChannel's unacknowledged bytes overflowed.
    OutboxOverflow,
    /// A `Disconnect*` API call named it.
    Api,
    /// No `pong` within the pong timeout.
    PongTimeout,
    /// hato is shutting down.
    Shutdown,
    /// One of its system DataChannels closed mid-session.
    DataChannelClosed,
    /// A send on one of its system DataChannels failed.
    DataChannelSendFailed,
}

impl Stop {
    /// The reason the peer, the logs, the metrics and the event webhook
    /// see.
    pub fn reason(self) -> &'static str {
        match self {
            Stop::OutboxOverflow => "OUTBOX-OVERFLOW",
            Stop::Api => "DISCONNECTED-API",
            Stop::PongTimeout => "PONG-TIMEOUT",
            Stop::Shutdown => "SHUTDOWN",
            Stop::DataChannelClosed => "DATA-CHANNEL-CLOSED",
            Stop::DataChannelSendFailed => "DATA-CHANNEL-SEND-FAILED",
        }
    }

    /// A DataChannel was lost under a live session.
    pub fn lost_a_channel(self) -> bool {
        matches!(self, Stop::DataChannelClosed | Stop::DataChannelSendFailed)
    }
}

impl End {
    /// A bounded name for metrics labels: free-text reasons fold into
    /// their kind.
    pub fn kind(&self) -> &'static str {
        match self {
            // The one refusal an anonymous peer can repeat at will once it
            // has an offer: counted apart from the rest.
            End::Refused(r) if r.starts_with(TOO_MANY_CANDIDATES) => TOO_MANY_CANDIDATES,
            End::Refused(_) => "REFUSED",
            End::PeerFailed(_) => "PEER-FAILED",
            End::ClientDisconnect => "TYPE-DISCONNECT",
            End::WebSocketLost => "WEBSOCKET-ONCLOSE",
            End::Server(stop) => stop.reason(),
        }
    }

    /// Why hato ended it, when it did.
    pub fn stop(&self) -> Option<Stop> {
        match self {
            End::Server(stop) => Some(*stop),
            _ => None,
        }
    }

    /// The reason an event webhook or a log names for this end.
    pub fn reason(&self) -> String {
        match self {
            End::Refused(r) | End::PeerFailed(r) => r.clone(),
            End::ClientDisconnect => "TYPE-DISCONNECT".into(),
            End::WebSocketLost => "WEBSOCKET-ONCLOSE".into(),
            End::Server(stop) => stop.reason().into(),
        }
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Apply the client's answer; report with [`Machine::answer_applied`].
    ApplyAnswer(String),
    /// Add a trickled remote candidate.
    AddCandidate(String),
    /// Send `{"type":"ping","stats":false}` on the WebSocket.
    SendPing,
    /// Join the connection table and send `connection.created` notifies.
    /// `message_limit`: the largest push its DataChannel takes, if pushes
    /// may go there.
    Register { message_limit: Option<usize> },
    /// Queue `switched` (then the DataChannels) behind what is queued.
    Switch { ignore_disconnect_websocket: bool },
    /// The session is over.
    End(End),
}

/// How the connection is closed for a given [`End`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Closing {
    /// A WebSocket Close frame (code, reason).
    pub websocket: Option<(u16, String)>,
    /// `{"type":"close"}` on the `signaling` DataChannel (code, reason).
    pub signaling: Option<(u16, String)>,
    /// Close the DataChannels and wait for the client to close its side.
    pub close_channels: bool,
}

/// Where a session is, after its offer. Each phase follows the one
/// before; an end can come in any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// The offer is out; no answer yet.
    Offered,
    /// The answer was handed to the shell; its result is pending.
    Applying,
    /// The answer is applied; ICE and DTLS are not up yet.
    Answered,
    /// ICE and DTLS are up: the connection is in the table.
    Connected,
    /// Every system DataChannel is open and `switched` was sent.
    Switched,
}

#[derive(Debug)]
pub struct Machine {
    rules: Rules,
    mode: Mode,
    phase: Phase,
    /// The system DataChannels open so far.
    open: Vec<String>,
    ws_alive: bool,
    message_limit: Option<usize>,
    last_pong: Instant,
    /// When the current phase (answer, then establishment) times out.
    deadline: Instant,
    next_ping: Option<Instant>,
    /// Remote candidates given so far.
    candidates: usize,
    /// One of hato's channels closed while the association stayed: the
    /// session ends with DATA-CHANNEL-CLOSED at this time, unless the
    /// whole PeerConnection closes first (a peer leaving closes every
    /// channel, then the association).
    channel_lost: Option<(Instant, Stop)>,
    actions: VecDeque<Action>,
    ended: bool,
}

/// How long after one of its channels closes a peer's association may
/// still end (a normal leave) before the closed channel ends the session.
pub const CHANNEL_LOSS_GRACE: Duration = Duration::from_millis(1000);

impl Machine {
    /// The offer has just been sent at `now`.
    pub fn new(now: Instant, rules: Rules, mode: Mode) -> Machine {
        Machine {
            deadline: now + rules.answer_timeout,
            rules,
            mode,
            phase: Phase::Offered,
            open: Vec::new(),
            ws_alive: true,
            message_limit: None,
            last_pong: now,
            next_ping: None,
            channel_lost: None,
            candidates: 0,
            actions: VecDeque::new(),
            ended: false,
        }
    }

    /// Registered and, with DataChannel signaling, switched.
    pub fn established(&self) -> bool {
        match self.phase {
            Phase::Connected => !self.mode.data_channel_signaling,
            Phase::Switched => true,
            _ => false,
        }
    }

    pub fn switched(&self) -> bool {
        self.phase == Phase::Switched
    }

    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Whether the WebSocket still carries signaling: after the switch
    /// with `ignore_disconnect_websocket` it does not (§3.9).
    pub fn ws_in_use(&self) -> bool {
        self.ws_alive && !self.dc_only()
    }

    /// Switched with `ignore_disconnect_websocket`: DataChannels only.
    fn dc_only(&self) -> bool {
        self.phase == Phase::Switched && self.mode.ignore_disconnect_websocket
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ended {
            return None;
        }
        let phase = (!self.established()).then_some(self.deadline);
        [phase, self.next_ping, self.channel_lost.map(|(at, _)| at)]
            .into_iter()
            .flatten()
            .min()
    }

    fn end(&mut self, end: End) {
        if !self.ended {
            self.ended = true;
            self.actions.push_back(Action::End(end));
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        if let Some((at, reason)) = self.channel_lost {
            if now >= at {
                return self.end(End::Server(reason));
            }
        }
        if !self.established() && now >= self.deadline {
            return self.end(End::Refused(if self.phase >= Phase::Answered {
                "connection not established before the timeout".into()
            } else {
                "no answer before the timeout".into()
            }));
        }
        if let Some(at) = self.next_ping {
            if now >= at {
                if !self.ws_in_use() {
                    // After the switch with ignore_disconnect_websocket,
                    // liveness rests on ICE and SCTP (§5.3).
                    self.next_ping = None;
                } else if now.duration_since(self.last_pong) > self.rules.pong_timeout {
                    self.end(End::Server(Stop::PongTimeout));
                } else {
                    self.actions.push_back(Action::SendPing);
                    self.next_ping = Some(now + self.rules.ping_interval);
                }
            }
        }
    }

    /// A text frame on the WebSocket.
    pub fn on_ws_text(&mut self, now: Instant, text: &[u8]) {
        match ClientMessage::parse(text) {
            Ok(msg) => self.on_message(now, msg, None),
            Err(e) => self.end(End::Refused(e.0)),
        }
    }

    /// A binary frame on the WebSocket: the SDKs send JSON text only.
    pub fn on_ws_binary(&mut self) {
        self.end(End::Refused(
            "binary frames are not accepted; send JSON text".into(),
        ));
    }

    /// The WebSocket closed or broke.
    pub fn on_ws_closed(&mut self) {
        self.ws_alive = false;
        if !self.dc_only() {
            self.end(End::WebSocketLost);
        }
    }

    /// A message on a DataChannel. Anything malformed is dropped, never
    /// fatal (§4.3); returns why it was dropped, for the log.
    pub fn on_dc_message(
        &mut self,
        now: Instant,
        label: &str,
        data: &[u8],
        text: bool,
    ) -> Result<(), String> {
        let inflated;
        let bytes = if self.mode.compress && !text {
            inflated = zlib::decompress(data, self.rules.client_message_limit)
                .map_err(|e| e.to_string())?;
            &inflated[..]
        } else {
            data
        };
        match ClientMessage::parse(bytes) {
            Ok(ClientMessage::Answer { .. }) | Ok(ClientMessage::Connect(_)) => {
                Err("connect/answer on a DataChannel".into())
            }
            Ok(msg) => {
                self.on_message(now, msg, Some(label));
                Ok(())
            }
            Err(e) => Err(e.0),
        }
    }

    /// A client message from the WebSocket (`label` None) or a DataChannel.
    fn on_message(&mut self, now: Instant, msg: ClientMessage, label: Option<&str>) {
        match msg {
            ClientMessage::Connect(_) => {
                self.end(End::Refused("connect was already received".into()))
            }
            ClientMessage::Answer { sdp } if label.is_none() => {
                if self.phase >= Phase::Applying {
                    return; // a second answer is ignored
                }
                let (sdp, theirs) = if self.mode.libwebrtc && !sdp::declares_max_message_size(&sdp)
                {
                    let n = sdp::LIBWEBRTC_MAX_MESSAGE_SIZE;
                    (sdp::with_max_message_size(&sdp, n), Some(n))
                } else {
                    let theirs = sdp::max_message_size(&sdp);
                    (sdp, theirs)
                };
                if let Some(n) = theirs.filter(|n| *n < sdp::MIN_MAX_MESSAGE_SIZE) {
                    return self.end(End::Refused(format!(
                        "a=max-message-size:{n} is below {} bytes",
                        sdp::MIN_MAX_MESSAGE_SIZE
                    )));
                }
                if self.count_candidates(sdp::candidate_count(&sdp)) {
                    return;
                }
                self.phase = Phase::Applying;
                let limit = self.rules.data_channel_message_limit;
                self.message_limit = self
                    .mode
                    .data_channel_signaling
                    .then(|| theirs.map_or(limit, |n| n.min(limit)));
                self.actions.push_back(Action::ApplyAnswer(sdp));
            }
            ClientMessage::Candidate(c) => self.on_candidate(c.candidate),
            ClientMessage::Pong | ClientMessage::Stats => self.last_pong = now,
            ClientMessage::Disconnect { .. } => self.end(End::ClientDisconnect),
            _ => {}
        }
    }

    /// A trickled candidate; an empty one says "no more": not an address.
    fn on_candidate(&mut self, candidate: String) {
        if !candidate.trim().is_empty() && !self.count_candidates(1) {
            self.actions.push_back(Action::AddCandidate(candidate))
        }
    }

    /// Counts `n` more remote candidates; over [`Rules::max_candidates`]
    /// the session ends (returns `true`): every candidate is an address
    /// hato would check, and their pairs cost CPU with the square of
    /// their number.
    fn count_candidates(&mut self, n: usize) -> bool {
        self.candidates += n;
        if self.candidates <= self.rules.max_candidates {
            return false;
        }
        self.end(End::Refused(format!(
            "{TOO_MANY_CANDIDATES}: more than {} remote candidates",
            self.rules.max_candidates
        )));
        true
    }

    /// The shell applied the answer (or could not).
    pub fn answer_applied(&mut self, now: Instant, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.phase = self.phase.max(Phase::Answered);
                self.last_pong = now;
                self.deadline = now + self.rules.establish_timeout;
                // CPP ignores pings before its answer is out (§3.4).
                self.next_ping = Some(now + self.rules.ping_interval);
            }
            Err(e) => self.end(End::Refused(format!(
                "the answer could not be applied: {e}"
            ))),
        }
    }

    /// ICE and DTLS are up: register (once), then maybe switch.
    pub fn on_transport_connected(&mut self) {
        if self.phase < Phase::Connected {
            self.phase = Phase::Connected;
            self.actions.push_back(Action::Register {
                message_limit: self.message_limit,
            });
            self.maybe_switch();
        }
    }

    pub fn on_channel_open(&mut self, label: &str) {
        if !self.open.iter().any(|l| l == label) {
            self.open.push(label.to_owned());
        }
        self.maybe_switch();
    }

    /// A DataChannel closed. One of hato's own, once open, is never
    /// closed by a live session: the pushes and notifies it carried would
    /// be lost without a word, so the session ends, saying why — after
    /// [`CHANNEL_LOSS_GRACE`], in which a peer that is leaving altogether
    /// ends its association (then the session ends as a normal leave).
    pub fn on_channel_closed(&mut self, now: Instant, label: &str) {
        if self.open.iter().any(|l| l == label) {
            self.lose_channel(now, Stop::DataChannelClosed);
        }
    }

    /// A send on a DataChannel failed: what it carried is lost, so the
    /// session ends, saying why (with the same grace).
    pub fn on_send_failed(&mut self, now: Instant) {
        self.lose_channel(now, Stop::DataChannelSendFailed);
    }

    fn lose_channel(&mut self, now: Instant, stop: Stop) {
        if self.channel_lost.is_none() {
            self.channel_lost = Some((now + CHANNEL_LOSS_GRACE, stop));
        }
    }

    /// The PeerConnection failed or the association ended.
    pub fn on_transport_failed(&mut self, reason: String) {
        self.end(End::PeerFailed(reason));
    }

    /// hato ends the session (overflow, API, shutdown).
    pub fn on_server_end(&mut self, stop: Stop) {
        self.end(End::Server(stop));
    }

    /// Every listed DataChannel is open and the peer is registered (§4.4).
    fn maybe_switch(&mut self) {
        if self.mode.data_channel_signaling
            && self.phase == Phase::Connected
            && SYSTEM_LABELS
                .iter()
                .all(|(l, _)| self.open.iter().any(|o| o == l))
        {
            self.phase = Phase::Switched;
            self.actions.push_back(Action::Switch {
                ignore_disconnect_websocket: self.mode.ignore_disconnect_websocket,
            });
        }
    }

    /// What the peer is told when the session ends with `end` (§5).
    pub fn closing(&self, end: &End) -> Closing {
        let dc_only = self.dc_only();
        let ws_open = self.ws_in_use();
        let mut c = Closing {
            close_channels: self.mode.data_channel_signaling && self.phase >= Phase::Connected,
            ..Closing::default()
        };
        match end {
            End::Refused(reason) if ws_open => {
                c.websocket = Some((SIGNALING_ERROR, reason.clone()))
            }
            End::ClientDisconnect if ws_open => {
                c.websocket = Some((1000, "TYPE-DISCONNECT".into()))
            }
            End::PeerFailed(reason) if ws_open => c.websocket = Some((1000, reason.clone())),
            End::Server(stop) if dc_only => c.signaling = Some((1000, stop.reason().into())),
            End::Server(stop) if ws_open => c.websocket = Some((1000, stop.reason().into())),
            _ => {}
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            answer_timeout: Duration::from_secs(10),
            establish_timeout: Duration::from_secs(20),
            ping_interval: Duration::from_secs(5),
            pong_timeout: Duration::from_secs(15),
            client_message_limit: 1 << 20,
            data_channel_message_limit: 262_144,
            max_candidates: 4,
        }
    }

    fn mode(dc: bool, ignore: bool) -> Mode {
        Mode {
            data_channel_signaling: dc,
            ignore_disconnect_websocket: ignore,
            compress: false,
            libwebrtc: false,
        }
    }

    fn actions(m: &mut Machine) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    const ANSWER: &[u8] = br#"{"type":"answer","sdp":"v=0\r\na=max-message-size:2000\r\n"}"#;

    /// Answered and applied at `t`, connected, every channel open.
    fn switched(t: Instant, ignore: bool) -> Machine {
        let mut m = Machine::new(t, rules(), mode(true, ignore));
        m.on_ws_text(t, ANSWER);
        m.answer_applied(t, Ok(()));
        m.on_transport_connected();
        for (l, _) in SYSTEM_LABELS {
            m.on_channel_open(l);
        }
        actions(&mut m);
        m
    }

    #[test]
    fn no_answer_before_the_timeout_is_refused_4490() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(false, false));
        assert_eq!(m.poll_timeout(), Some(t + Duration::from_secs(10)));
        m.handle_timeout(t + Duration::from_secs(9));
        assert!(actions(&mut m).is_empty());
        m.handle_timeout(t + Duration::from_secs(10));
        let end = End::Refused("no answer before the timeout".into());
        assert_eq!(actions(&mut m), [Action::End(end.clone())]);
        assert_eq!(
            m.closing(&end).websocket,
            Some((4490, "no answer before the timeout".into()))
        );
    }

    #[test]
    fn the_answer_is_applied_once_and_starts_the_establish_deadline_and_pings() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(true, false));
        m.on_ws_text(t, ANSWER);
        m.on_ws_text(t, ANSWER);
        let sdp = "v=0\r\na=max-message-size:2000\r\n".to_owned();
        assert_eq!(actions(&mut m), [Action::ApplyAnswer(sdp)]);
        let t1 = t + Duration::from_secs(1);
        m.answer_applied(t1, Ok(()));
        assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(5)));
        m.handle_timeout(t1 + Duration::from_secs(5));
        assert_eq!(actions(&mut m), [Action::SendPing]);
        m.handle_timeout(t1 + Duration::from_secs(20));
        assert!(
            matches!(&actions(&mut m)[..], [Action::End(End::Refused(r))] if r.contains("not established"))
        );
    }

    #[test]
    fn an_answer_that_cannot_be_applied_is_refused() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(false, false));
        m.on_ws_text(t, ANSWER);
        actions(&mut m);
        m.answer_applied(t, Err("bad sdp".into()));
        assert!(
            matches!(&actions(&mut m)[..], [Action::End(End::Refused(r))] if r.contains("bad sdp"))
        );
    }

    #[test]
    fn a_push_limit_comes_from_the_answer_only_with_datachannel_signaling() {
        let t = Instant::now();
        for (dc, want) in [(true, Some(2000)), (false, None)] {
            let mut m = Machine::new(t, rules(), mode(dc, false));
            m.on_ws_text(t, ANSWER);
            m.answer_applied(t, Ok(()));
            m.on_transport_connected();
            let got = actions(&mut m);
            assert_eq!(
                got[1],
                Action::Register {
                    message_limit: want
                }
            );
        }
    }

    #[test]
    fn a_system_channel_that_closes_or_a_failed_send_ends_the_session() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(true, true));
        m.on_ws_text(t, ANSWER);
        m.answer_applied(t, Ok(()));
        m.on_channel_closed(t, "push"); // never open: nothing to lose
        m.on_channel_open("push");
        assert!(!actions(&mut m).iter().any(|a| matches!(a, Action::End(_))));
        m.on_channel_closed(t, "push");
        // A peer that is leaving ends its association within the grace.
        let mut leaving = Machine::new(t, rules(), mode(true, true));
        leaving.on_channel_open("push");
        leaving.on_channel_closed(t, "push");
        leaving.on_transport_failed("the SCTP association closed".into());
        assert!(matches!(
            &actions(&mut leaving)[..],
            [Action::End(End::PeerFailed(_))]
        ));
        // Otherwise the lost channel ends the session once the grace is over.
        assert!(m.poll_timeout() <= Some(t + CHANNEL_LOSS_GRACE));
        m.handle_timeout(t + CHANNEL_LOSS_GRACE);
        assert_eq!(
            actions(&mut m),
            [Action::End(End::Server(Stop::DataChannelClosed))]
        );
        let mut m = Machine::new(t, rules(), mode(true, true));
        m.on_send_failed(t);
        m.handle_timeout(t + CHANNEL_LOSS_GRACE);
        assert_eq!(
            actions(&mut m),
            [Action::End(End::Server(Stop::DataChannelSendFailed))]
        );
    }

    /// A native SDK (it names `libwebrtc`) answers with no
    /// `a=max-message-size`: the answer applied says 256 KiB, and so does
    /// the push limit; a browser's answer without one stays at 64 KiB.
    #[test]
    fn a_native_answer_without_max_message_size_takes_256_kib() {
        let t = Instant::now();
        let answer = br#"{"type":"answer","sdp":"v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\n"}"#;
        for (libwebrtc, want) in [(true, 262_144), (false, 65_536)] {
            let mut m = Machine::new(
                t,
                rules(),
                Mode {
                    libwebrtc,
                    ..mode(true, true)
                },
            );
            m.on_ws_text(t, answer);
            let applied = actions(&mut m);
            let [Action::ApplyAnswer(sdp)] = &applied[..] else {
                panic!("{applied:?}")
            };
            assert_eq!(
                sdp.contains("a=max-message-size:262144\r\n"),
                libwebrtc,
                "{sdp}"
            );
            m.answer_applied(t, Ok(()));
            m.on_transport_connected();
            assert!(actions(&mut m).contains(&Action::Register {
                message_limit: Some(want)
            }));
        }
    }

    #[test]
    fn an_answer_with_a_tiny_max_message_size_is_refused() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(true, false));
        m.on_ws_text(
            t,
            br#"{"type":"answer","sdp":"v=0\r\na=max-message-size:300\r\n"}"#,
        );
        assert_eq!(
            actions(&mut m),
            [Action::End(End::Refused(
                "a=max-message-size:300 is below 1024 bytes".into()
            ))]
        );
        let mut ok = Machine::new(t, rules(), mode(true, false));
        ok.on_ws_text(
            t,
            br#"{"type":"answer","sdp":"v=0\r\na=max-message-size:1024\r\n"}"#,
        );
        assert!(matches!(&actions(&mut ok)[..], [Action::ApplyAnswer(_)]));
    }

    #[test]
    fn switched_needs_registration_and_all_four_channels() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(true, true));
        m.on_ws_text(t, ANSWER);
        m.answer_applied(t, Ok(()));
        for (l, _) in &SYSTEM_LABELS[..3] {
            m.on_channel_open(l);
        }
        m.on_transport_connected();
        assert!(!actions(&mut m)
            .iter()
            .any(|a| matches!(a, Action::Switch { .. })));
        m.on_channel_open("stats");
        assert_eq!(
            actions(&mut m),
            [Action::Switch {
                ignore_disconnect_websocket: true
            }]
        );
        assert!(m.established());
        assert_eq!(m.poll_timeout(), Some(t + Duration::from_secs(5)));
    }

    #[test]
    fn a_lost_websocket_ends_the_session_except_after_switch_with_ignore() {
        let t = Instant::now();
        let mut ws_only = Machine::new(t, rules(), mode(false, false));
        ws_only.on_ws_closed();
        assert_eq!(actions(&mut ws_only), [Action::End(End::WebSocketLost)]);
        let mut hybrid = switched(t, false);
        hybrid.on_ws_closed();
        assert_eq!(actions(&mut hybrid), [Action::End(End::WebSocketLost)]);
        let mut dc_only = switched(t, true);
        dc_only.on_ws_closed();
        assert!(actions(&mut dc_only).is_empty());
        assert!(!dc_only.ws_in_use());
    }

    #[test]
    fn pings_stop_after_switch_with_ignore_and_a_late_pong_ends_the_rest() {
        let t = Instant::now();
        let mut dc_only = switched(t, true);
        dc_only.handle_timeout(t + Duration::from_secs(60));
        assert!(actions(&mut dc_only).is_empty());
        assert_eq!(dc_only.poll_timeout(), None);

        let mut ws = Machine::new(t, rules(), mode(false, false));
        ws.on_ws_text(t, ANSWER);
        ws.answer_applied(t, Ok(()));
        ws.on_transport_connected();
        actions(&mut ws);
        let mut now = t;
        for _ in 0..3 {
            now += Duration::from_secs(5);
            ws.handle_timeout(now);
            assert_eq!(actions(&mut ws), [Action::SendPing]);
        }
        // A pong on a DataChannel counts too (RS sends it on signaling).
        ws.on_dc_message(now, "signaling", br#"{"type":"pong"}"#, true)
            .unwrap();
        now += Duration::from_secs(15);
        ws.handle_timeout(now);
        assert_eq!(actions(&mut ws), [Action::SendPing]);
        now += Duration::from_secs(5);
        ws.handle_timeout(now);
        assert_eq!(
            actions(&mut ws),
            [Action::End(End::Server(Stop::PongTimeout))]
        );
    }

    #[test]
    fn bad_websocket_input_is_refused_bad_datachannel_input_is_dropped() {
        let t = Instant::now();
        let mut m = switched(t, false);
        assert!(m.on_dc_message(t, "signaling", b"{not json", true).is_err());
        assert!(m.on_dc_message(t, "signaling", ANSWER, true).is_err());
        assert!(m
            .on_dc_message(t, "signaling", br#"{"type":"connect"}"#, false)
            .is_err());
        assert!(actions(&mut m).is_empty());
        m.on_ws_text(t, b"{not json");
        assert!(matches!(
            &actions(&mut m)[..],
            [Action::End(End::Refused(_))]
        ));

        let mut again = Machine::new(t, rules(), mode(false, false));
        again.on_ws_text(
            t,
            br#"{"type":"connect","role":"recvonly","channel_id":"x"}"#,
        );
        assert_eq!(
            actions(&mut again),
            [Action::End(End::Refused(
                "connect was already received".into()
            ))]
        );
        let mut binary = Machine::new(t, rules(), mode(false, false));
        binary.on_ws_binary();
        assert!(matches!(
            &actions(&mut binary)[..],
            [Action::End(End::Refused(_))]
        ));
    }

    #[test]
    fn compressed_labels_are_inflated_and_a_bomb_is_dropped() {
        let t = Instant::now();
        let mut m = Machine::new(
            t,
            Rules {
                client_message_limit: 1000,
                ..rules()
            },
            Mode {
                compress: true,
                ..mode(true, true)
            },
        );
        let disconnect = zlib::compress(br#"{"type":"disconnect","reason":"NO-ERROR"}"#);
        let bomb = zlib::compress(&vec![b' '; 100_000]);
        assert!(m.on_dc_message(t, "signaling", &bomb, false).is_err());
        m.on_dc_message(t, "signaling", &disconnect, false).unwrap();
        assert_eq!(actions(&mut m), [Action::End(End::ClientDisconnect)]);
    }

    #[test]
    fn candidates_on_either_transport_are_added() {
        let t = Instant::now();
        let mut m = switched(t, false);
        m.on_ws_text(
            t,
            br#"{"type":"candidate","candidate":"candidate:1 1 udp 1 127.0.0.1 9 typ host"}"#,
        );
        m.on_dc_message(
            t,
            "signaling",
            br#"{"type":"candidate","candidate":""}"#,
            true,
        )
        .unwrap();
        // The empty one (end of candidates) names no address.
        assert_eq!(
            actions(&mut m),
            [Action::AddCandidate(
                "candidate:1 1 udp 1 127.0.0.1 9 typ host".into()
            )]
        );
    }

    #[test]
    fn more_candidates_than_the_rules_allow_end_the_session_4490() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(false, false));
        let sdp = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=candidate:1 1 udp 1 198.51.100.1 9 typ host\r\na=candidate:2 1 udp 1 198.51.100.2 9 typ host\r\n";
        m.on_ws_text(
            t,
            serde_json::json!({"type": "answer", "sdp": sdp})
                .to_string()
                .as_bytes(),
        );
        assert!(matches!(&actions(&mut m)[..], [Action::ApplyAnswer(_)]));
        let c = |n: u8| {
            format!(
                r#"{{"type":"candidate","candidate":"candidate:{n} 1 udp 1 198.51.100.{n} 9 typ host"}}"#
            )
        };
        m.on_ws_text(t, c(3).as_bytes());
        m.on_ws_text(t, br#"{"type":"candidate","candidate":""}"#);
        m.on_ws_text(t, c(4).as_bytes());
        assert_eq!(actions(&mut m).len(), 2);
        m.on_ws_text(t, c(5).as_bytes());
        let end = End::Refused("TOO-MANY-CANDIDATES: more than 4 remote candidates".into());
        assert_eq!(actions(&mut m), [Action::End(end.clone())]);
        assert_eq!(end.kind(), "TOO-MANY-CANDIDATES");
        assert_eq!(
            m.closing(&end).websocket,
            Some((
                4490,
                "TOO-MANY-CANDIDATES: more than 4 remote candidates".into()
            ))
        );
    }

    #[test]
    fn which_end_gives_which_close() {
        let t = Instant::now();
        let ws = Machine::new(t, rules(), mode(false, false));
        let hybrid = switched(t, false);
        let mut dc_only = switched(t, true);
        dc_only.on_ws_closed();
        let ws_close = |m: &Machine, e: End| m.closing(&e).websocket;
        assert_eq!(
            ws_close(&ws, End::ClientDisconnect),
            Some((1000, "TYPE-DISCONNECT".into()))
        );
        assert_eq!(
            ws_close(&hybrid, End::ClientDisconnect),
            Some((1000, "TYPE-DISCONNECT".into()))
        );
        assert_eq!(
            ws_close(&ws, End::Server(Stop::Api)),
            Some((1000, "DISCONNECTED-API".into()))
        );
        assert_eq!(
            ws_close(&ws, End::PeerFailed("x".into())),
            Some((1000, "x".into()))
        );
        assert_eq!(ws_close(&ws, End::WebSocketLost), None);
        // DataChannel only: the reason travels on `signaling`, the
        // channels are closed, nothing goes on the (gone) WebSocket.
        let c = dc_only.closing(&End::Server(Stop::Shutdown));
        assert_eq!(c.signaling, Some((1000, "SHUTDOWN".into())));
        assert_eq!(c.websocket, None);
        assert!(c.close_channels);
        assert_eq!(
            dc_only.closing(&End::ClientDisconnect),
            Closing {
                close_channels: true,
                ..Default::default()
            }
        );
        assert!(!ws.closing(&End::ClientDisconnect).close_channels);
    }

    #[test]
    fn nothing_happens_after_the_end() {
        let t = Instant::now();
        let mut m = Machine::new(t, rules(), mode(false, false));
        m.on_server_end(Stop::Shutdown);
        m.on_ws_closed();
        m.on_transport_failed("x".into());
        m.handle_timeout(t + Duration::from_secs(100));
        assert_eq!(actions(&mut m), [Action::End(End::Server(Stop::Shutdown))]);
        assert_eq!(m.poll_timeout(), None);
    }
}
