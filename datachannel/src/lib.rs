//! WebRTC DataChannel peers over the `webrtc` crate, for a push server.
//!
//! [`Peer::offer`] is the server side: one `m=application` section, the
//! server's host candidates inside the SDP (no Sora SDK takes server
//! `candidate` messages), DataChannels created in-band before the offer.
//! [`Peer::answer`] is the client side, for tests and the load harness.
//! Both report what happens as [`PeerEvent`]s on one channel, so the owner
//! runs a single select loop. Nothing here knows about channels, roles or
//! pushes.

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use webrtc::data_channel::{
    DataChannel, DataChannelEvent, RTCDataChannelInit, RTCDataChannelState,
};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceCandidateType, RTCIceGatheringState, RTCPeerConnectionState,
    RTCSessionDescription, SettingEngineBuilder,
};

pub use webrtc::error::Error as WebRtcError;

/// How a peer binds and what it advertises.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The address ICE binds (port 0: one ephemeral UDP port per peer).
    /// A concrete address binds exactly that interface; `0.0.0.0` binds every
    /// non-loopback interface.
    pub bind: IpAddr,
    /// Addresses written into candidates instead of the bound one (Sora's
    /// public IP setting, for NAT 1:1 or containers).
    pub advertise: Vec<IpAddr>,
    /// Our `a=max-message-size`: the largest message we accept.
    pub max_message_size: u32,
    /// Per-channel send buffer in bytes; `send` waits while it is full.
    pub send_buffer: usize,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            bind: IpAddr::from([127, 0, 0, 1]),
            advertise: Vec::new(),
            max_message_size: 262_144,
            send_buffer: 1 << 20,
        }
    }
}

/// What happened on a peer.
#[derive(Debug)]
pub enum PeerEvent {
    /// ICE and DTLS are up.
    Connected,
    /// The PeerConnection failed or closed; nothing more will arrive.
    Failed(String),
    /// A DataChannel is open (both ends).
    Open(Arc<str>),
    Message {
        label: Arc<str>,
        data: Bytes,
        text: bool,
    },
    Closed(Arc<str>),
}

#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<WebRtcError> for Error {
    fn from(e: WebRtcError) -> Self {
        Error(e.to_string())
    }
}

type Channels = Arc<Mutex<HashMap<Arc<str>, Arc<dyn DataChannel>>>>;

/// One end of a WebRTC connection carrying only DataChannels.
pub struct Peer {
    pc: Arc<dyn PeerConnection>,
    // A std mutex: held only to clone an `Arc` out, never across `.await`.
    channels: Channels,
}

struct Handler {
    events: mpsc::Sender<PeerEvent>,
    channels: Channels,
    gathered: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let event = match state {
            RTCPeerConnectionState::Connected => PeerEvent::Connected,
            RTCPeerConnectionState::Failed => PeerEvent::Failed("connection failed".into()),
            RTCPeerConnectionState::Closed => PeerEvent::Failed("connection closed".into()),
            _ => return,
        };
        let _ = self.events.send(event).await;
    }

    /// Only the answering side sees these: Sora-style servers create every
    /// channel themselves.
    async fn on_data_channel(&self, dc: Arc<dyn DataChannel>) {
        let Ok(label) = dc.label().await else { return };
        let label: Arc<str> = label.into();
        self.channels
            .lock()
            .unwrap()
            .insert(label.clone(), dc.clone());
        tokio::spawn(pump(dc, label, self.events.clone()));
    }
}

/// Forwards one channel's events until it closes.
async fn pump(dc: Arc<dyn DataChannel>, label: Arc<str>, events: mpsc::Sender<PeerEvent>) {
    let mut opened = false;
    // The open may have happened before this task polled (webrtc#901).
    if matches!(dc.ready_state().await, Ok(RTCDataChannelState::Open)) {
        opened = true;
        if events.send(PeerEvent::Open(label.clone())).await.is_err() {
            return;
        }
    }
    while let Some(event) = dc.poll().await {
        let out = match event {
            DataChannelEvent::OnOpen if !opened => {
                opened = true;
                PeerEvent::Open(label.clone())
            }
            DataChannelEvent::OnMessage(m) => PeerEvent::Message {
                label: label.clone(),
                data: m.data.freeze(),
                text: m.is_string,
            },
            DataChannelEvent::OnClose => break,
            _ => continue,
        };
        if events.send(out).await.is_err() {
            return;
        }
    }
    let _ = events.send(PeerEvent::Closed(label)).await;
}

/// The label of the unannounced negotiated channel.
const QUIET_LABEL: &str = "hato-sctp";

/// How often, how long and how many turns after the last open
/// [`Peer::nudge`] wakes the driver.
const NUDGE_EVERY: Duration = Duration::from_millis(3);
const NUDGE_FOR: Duration = Duration::from_secs(5);
const NUDGE_TAIL: u32 = 5;

/// How long ICE gathering may take before the SDP goes out with what it has.
const GATHER_TIMEOUT: Duration = Duration::from_secs(5);

/// Events buffered per peer before the DataChannel tasks wait for the owner.
const EVENT_BUFFER: usize = 64;

async fn build(cfg: &PeerConfig, handler: Handler) -> Result<Arc<dyn PeerConnection>, Error> {
    let mut se = SettingEngineBuilder::new()
        // The crate's 200 ms check interval, with the first check dropped,
        // makes offer → connected take ~400 ms on loopback; 20 ms, ~50 ms.
        .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(50))
        .with_ice_timeouts(
            Some(Duration::from_secs(4)),
            Some(Duration::from_secs(8)),
            Some(Duration::from_secs(2)),
        )
        .with_host_acceptance_min_wait(Some(Duration::ZERO))
        // Browsers hide host addresses behind mDNS names, so their pair is
        // usually peer-reflexive, which the crate accepts only after 1 s
        // (srflx 500 ms) by default: Chromium took ~1.6 s to connect.
        // A push server has nothing better to wait for.
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_srflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_include_loopback_candidate(cfg.bind.is_loopback() || cfg.bind.is_unspecified())
        .with_sctp_max_message_size(
            rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize::Bounded(
                cfg.max_message_size,
            ),
        );
    if !cfg.advertise.is_empty() {
        se = se.with_nat_1to1_ips(
            cfg.advertise.iter().map(ToString::to_string).collect(),
            RTCIceCandidateType::Host,
        );
    }
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_setting_engine(se.build())
        .with_handler(Arc::new(handler))
        .with_udp_addrs(vec![SocketAddr::new(cfg.bind, 0)])
        .with_data_channel_send_buffer_limit(cfg.send_buffer)
        .build()
        .await?;
    Ok(Arc::new(pc))
}

impl Peer {
    fn handler(events: mpsc::Sender<PeerEvent>) -> (Handler, Channels, watch::Receiver<bool>) {
        let channels: Channels = Arc::default();
        let (gathered, gathered_rx) = watch::channel(false);
        (
            Handler {
                events,
                channels: channels.clone(),
                gathered,
            },
            channels,
            gathered_rx,
        )
    }

    /// The offering (server) side. Creates `labels` as ordered, reliable,
    /// in-band channels and returns the offer SDP with every host candidate
    /// in it. With no labels the offer still has an `m=application` section
    /// (an unannounced negotiated channel holds it open): without one no
    /// transport exists and SDKs never reach "connected".
    pub async fn offer(
        cfg: &PeerConfig,
        labels: &[&str],
    ) -> Result<(Peer, String, mpsc::Receiver<PeerEvent>), Error> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (handler, channels, gathered) = Peer::handler(tx.clone());
        let pc = build(cfg, handler).await?;
        let peer = Peer { pc, channels };
        if labels.is_empty() {
            peer.add_quiet_channel(0).await?;
        }
        for label in labels {
            let dc = peer
                .pc
                .create_data_channel(label, Some(RTCDataChannelInit::default()))
                .await?;
            let label: Arc<str> = (*label).into();
            peer.channels
                .lock()
                .unwrap()
                .insert(label.clone(), dc.clone());
            tokio::spawn(pump(dc, label, tx.clone()));
        }
        let offer = peer.pc.create_offer(None).await?;
        peer.pc.set_local_description(offer).await?;
        let sdp = peer.local_sdp(gathered).await?;
        Ok((peer, sdp, rx))
    }

    /// The answering (client) side: applies `offer_sdp`, answers with the
    /// candidates inside. Channels the offerer opens arrive as events.
    pub async fn answer(
        cfg: &PeerConfig,
        offer_sdp: &str,
    ) -> Result<(Peer, String, mpsc::Receiver<PeerEvent>), Error> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let (handler, channels, gathered) = Peer::handler(tx);
        let pc = build(cfg, handler).await?;
        let peer = Peer { pc, channels };
        peer.pc
            .set_remote_description(RTCSessionDescription::offer(offer_sdp.to_owned())?)
            .await?;
        let answer = peer.pc.create_answer(None).await?;
        peer.pc.set_local_description(answer).await?;
        let sdp = peer.local_sdp(gathered).await?;
        // An even id, never one the offerer (the DTLS server, odd ids) opens.
        peer.add_quiet_channel(1022).await?;
        Ok((peer, sdp, rx))
    }

    /// A negotiated channel that nobody announces (no DCEP): it keeps an
    /// `m=application` section in an offer without channels, and gives
    /// [`Peer::nudge`] a handle on the answering side.
    async fn add_quiet_channel(&self, id: u16) -> Result<(), Error> {
        let init = RTCDataChannelInit {
            negotiated: Some(id),
            ..Default::default()
        };
        let dc = self.pc.create_data_channel(QUIET_LABEL, Some(init)).await?;
        // Kept so that dropping the handle cannot remove it.
        self.channels.lock().unwrap().insert(QUIET_LABEL.into(), dc);
        Ok(())
    }

    /// Works around the `webrtc` 0.21.1 driver holding SCTP output queued
    /// while it handled an event (the INIT after DTLS, the DCEP OPENs after
    /// the association is up, their ACKs) until its next timer, 200 ms
    /// later: it writes before it handles events in each loop turn. Any
    /// channel call that wakes the driver flushes that output, so this wakes
    /// it every [`NUDGE_EVERY`] until `expect` channels are open (plus a few
    /// turns for the last ACK), for at most [`NUDGE_FOR`].
    pub fn nudge(&self, expect: usize) {
        let pc = Arc::downgrade(&self.pc);
        let channels = self.channels.clone();
        tokio::spawn(async move {
            let until = tokio::time::Instant::now() + NUDGE_FOR;
            let mut tail = NUDGE_TAIL;
            while tokio::time::Instant::now() < until && tail > 0 {
                tokio::time::sleep(NUDGE_EVERY).await;
                if pc.strong_count() == 0 {
                    return;
                }
                let dcs: Vec<_> = channels.lock().unwrap().values().cloned().collect();
                let mut open = 0;
                for dc in &dcs {
                    if matches!(dc.ready_state().await, Ok(RTCDataChannelState::Open)) {
                        open += 1;
                    }
                }
                if open >= expect {
                    tail -= 1;
                }
                if let Some(dc) = dcs.first() {
                    // Setting the threshold it already has changes nothing
                    // but wakes the driver.
                    if let Ok(t) = dc.buffered_amount_low_threshold().await {
                        let _ = dc.set_buffered_amount_low_threshold(t).await;
                    }
                }
            }
        });
    }

    async fn local_sdp(&self, mut gathered: watch::Receiver<bool>) -> Result<String, Error> {
        let _ = tokio::time::timeout(GATHER_TIMEOUT, gathered.wait_for(|done| *done)).await;
        self.pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or_else(|| Error("no local description".into()))
    }

    /// Applies the remote answer (offering side).
    pub async fn apply_answer(&self, sdp: &str) -> Result<(), Error> {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(sdp.to_owned())?)
            .await?;
        Ok(())
    }

    /// Adds a trickled remote candidate. `sdp_mid` and `sdp_mline_index` may
    /// both be absent (CPP, RS); an empty candidate (end of candidates) is
    /// accepted and ignored.
    pub async fn add_candidate(
        &self,
        candidate: &str,
        sdp_mid: Option<String>,
        sdp_mline_index: Option<u16>,
    ) -> Result<(), Error> {
        if candidate.trim().is_empty() {
            return Ok(());
        }
        let init = RTCIceCandidateInit {
            candidate: candidate.to_owned(),
            sdp_mid: sdp_mid.or_else(|| sdp_mline_index.is_none().then(|| "0".to_owned())),
            sdp_mline_index,
            username_fragment: None,
            ..Default::default()
        };
        self.pc.add_ice_candidate(init).await?;
        Ok(())
    }

    fn channel(&self, label: &str) -> Result<Arc<dyn DataChannel>, Error> {
        self.channels
            .lock()
            .unwrap()
            .get(label)
            .cloned()
            .ok_or_else(|| Error(format!("no DataChannel {label:?}")))
    }

    /// Sends one message on `label`, as a text or a binary message. Waits
    /// while the channel's send buffer is full.
    pub async fn send(&self, label: &str, data: &[u8], text: bool) -> Result<(), Error> {
        let dc = self.channel(label)?;
        if text {
            let s = std::str::from_utf8(data).map_err(|e| Error(e.to_string()))?;
            dc.send_text(s).await?;
        } else {
            dc.send(BytesMut::from(data)).await?;
        }
        Ok(())
    }

    /// Bytes handed to `label` and not yet acknowledged by the peer.
    pub async fn buffered(&self, label: &str) -> Result<usize, Error> {
        Ok(self.channel(label)?.outstanding_bytes().await?)
    }

    /// Waits (at most `limit`) until every channel's sent data has been
    /// acknowledged, so a close that follows cannot overtake it.
    pub async fn drain(&self, limit: Duration) {
        let channels: Vec<_> = self.channels.lock().unwrap().values().cloned().collect();
        let _ = tokio::time::timeout(limit, async {
            for dc in channels {
                while dc.outstanding_bytes().await.unwrap_or(0) > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
        .await;
    }

    /// Whether the SCTP association is gone (closed by either side, or
    /// never made): nothing more can travel on the DataChannels.
    pub async fn association_closed(&self) -> bool {
        use rtc::peer_connection::transport::RTCSctpTransportState;
        match self.pc.sctp().await {
            None => true,
            Some(sctp) => matches!(
                sctp.state().await,
                Ok(RTCSctpTransportState::Closed) | Err(_)
            ),
        }
    }

    /// Closes every DataChannel (an SCTP stream reset each), so the peer
    /// sees each `onclose`.
    pub async fn close_channels(&self) {
        let channels: Vec<_> = self.channels.lock().unwrap().values().cloned().collect();
        for dc in channels {
            let _ = dc.close().await;
        }
    }

    /// Ends the connection; events stop after a final `Failed`/`Closed`.
    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}
