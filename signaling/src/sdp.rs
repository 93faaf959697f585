//! The few facts the server reads from the client's answer SDP.

/// RFC 8841 §6: without `a=max-message-size` the peer accepts 64 KiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 65_536;

/// The smallest `a=max-message-size` hato accepts in an answer: below it
/// no push fits, and the SCTP stack logs an error for every packet it
/// cannot send.
pub const MIN_MAX_MESSAGE_SIZE: usize = 1024;

/// What libwebrtc's SCTP receives (Chromium answers 262144), although the
/// native SDKs built on it answer with no `a=max-message-size` at all.
pub const LIBWEBRTC_MAX_MESSAGE_SIZE: usize = 262_144;

/// The `a=candidate` lines of an SDP.
pub fn candidate_count(sdp: &str) -> usize {
    sdp.lines()
        .filter(|l| l.trim_start().starts_with("a=candidate:"))
        .count()
}

/// Whether the SDP says `a=max-message-size` at all.
pub fn declares_max_message_size(sdp: &str) -> bool {
    sdp.lines()
        .any(|l| l.trim().starts_with("a=max-message-size:"))
}

/// The SDP with `a=max-message-size:n` added to its `m=application`
/// section (which must not declare one already).
pub fn with_max_message_size(sdp: &str, n: usize) -> String {
    let mut out = String::with_capacity(sdp.len() + 32);
    let mut in_application = false;
    let mut added = false;
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") {
            if in_application && !added {
                out.push_str(&format!("a=max-message-size:{n}\r\n"));
                added = true;
            }
            in_application = line.starts_with("m=application");
        }
        out.push_str(line);
        if !line.ends_with('\n') {
            out.push_str("\r\n");
        }
    }
    if in_application && !added {
        out.push_str(&format!("a=max-message-size:{n}\r\n"));
    }
    out
}

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

    #[test]
    fn adds_the_attribute_to_the_application_section() {
        let native = "v=0\r\nm=audio 9 UDP\r\na=x\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\n";
        assert!(!declares_max_message_size(native));
        let with = with_max_message_size(native, 262_144);
        assert_eq!(
            with,
            "v=0\r\nm=audio 9 UDP\r\na=x\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n"
        );
        assert_eq!(max_message_size(&with), Some(262_144));
        let app_first = "v=0\r\nm=application 9 X\r\na=y\r\nm=audio 9 Z\r\n";
        assert_eq!(
            with_max_message_size(app_first, 1),
            "v=0\r\nm=application 9 X\r\na=y\r\na=max-message-size:1\r\nm=audio 9 Z\r\n"
        );
    }
}
