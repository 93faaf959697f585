//! The few facts the server reads from the client's answer SDP.

/// RFC 8841 §6: without `a=max-message-size` the peer accepts 64 KiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 65_536;

/// The smallest `a=max-message-size` hato accepts in an answer: below it
/// no push fits, and the SCTP stack logs an error for every packet it
/// cannot send.
pub const MIN_MAX_MESSAGE_SIZE: usize = 1024;

/// The largest DataChannel message the answering peer accepts, from its
/// `a=max-message-size`. `None` means "no limit" (the attribute is `0`).
pub fn max_message_size(sdp: &str) -> Option<usize> {
    for line in sdp.lines() {
        if let Some(v) = line.trim().strip_prefix("a=max-message-size:") {
            return match v.trim().parse::<usize>() {
                Ok(0) => None,
                Ok(n) => Some(n),
                Err(_) => Some(DEFAULT_MAX_MESSAGE_SIZE),
            };
        }
    }
    Some(DEFAULT_MAX_MESSAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_attribute() {
        let chrome = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n";
        assert_eq!(max_message_size(chrome), Some(262_144));
        assert_eq!(max_message_size("v=0\r\n"), Some(65_536));
        assert_eq!(max_message_size("a=max-message-size:0\r\n"), None);
    }
}
