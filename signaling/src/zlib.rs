//! `compress: true` DataChannels carry each message as its own zlib stream
//! (RFC 1950 — not raw deflate, not gzip; docs/protocol.md §4.2).

use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;
use std::io::{Read, Write};

pub fn compress(data: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::with_capacity(data.len() / 2 + 16), Compression::fast());
    e.write_all(data).expect("writing to a Vec cannot fail");
    e.finish().expect("writing to a Vec cannot fail")
}

#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    Corrupt(String),
    /// Inflating would exceed the cap: a zlib bomb, refused unexpanded.
    TooLarge(usize),
}

impl std::fmt::Display for InflateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InflateError::Corrupt(e) => write!(f, "corrupt zlib data: {e}"),
            InflateError::TooLarge(cap) => write!(f, "inflated message exceeds {cap} bytes"),
        }
    }
}

/// Inflates at most `cap` bytes; more is an error, and no more than
/// `cap + 1` bytes are ever allocated.
pub fn decompress(data: &[u8], cap: usize) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::new();
    ZlibDecoder::new(data)
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| InflateError::Corrupt(e.to_string()))?;
    if out.len() > cap {
        return Err(InflateError::TooLarge(cap));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_zlib_header() {
        let msg = br#"{"type":"push","data":{"n":1}}"#;
        let z = compress(msg);
        // RFC 1950: CMF 0x78, and (CMF*256 + FLG) divisible by 31.
        assert_eq!(z[0], 0x78);
        assert_eq!((u16::from(z[0]) * 256 + u16::from(z[1])) % 31, 0);
        assert_eq!(decompress(&z, 1024).unwrap(), msg);
    }

    #[test]
    fn bomb_is_refused() {
        let bomb = compress(&vec![b'a'; 8 * 1024 * 1024]);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        assert_eq!(
            decompress(&bomb, 65_536),
            Err(InflateError::TooLarge(65_536))
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            decompress(b"not zlib", 100),
            Err(InflateError::Corrupt(_))
        ));
        let raw_deflate = &compress(b"hello")[2..];
        assert!(decompress(raw_deflate, 100).is_err());
    }
}
