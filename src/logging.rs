//! Logs an attacker cannot flood. Every peer can make some log line
//! repeat — a malformed message, a refused connect, one of the ~85
//! warnings inside the WebRTC core — so the log pipeline itself caps each
//! line (its target and source line) at [`PER_SECOND`] a second and
//! folds the rest into one summary line a site every [`SUMMARY_EVERY`].
//! A line is also cut at [`MAX_LINE`] bytes, whatever a peer put in its
//! fields.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::subscriber::Interest;
use tracing::{Level, Metadata};
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Lines one site may write in a second.
pub const PER_SECOND: u32 = 20;

/// The longest line written; a longer one is cut (text), or replaced by a
/// line that says so with its first KiB (JSON, which must stay valid).
pub const MAX_LINE: usize = 8 * 1024;

/// Writes each formatted line (the fmt layer hands one per `write`) to
/// `W`, cut at [`MAX_LINE`].
struct MaxLine<W> {
    inner: W,
    json: bool,
}

impl<W: std::io::Write> std::io::Write for MaxLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() <= MAX_LINE {
            return self.inner.write(buf);
        }
        // The first `n` bytes, without a character cut in two.
        let head = |n: usize| {
            let text = String::from_utf8_lossy(&buf[..n]);
            text.trim_end_matches('\u{fffd}').to_owned()
        };
        let line = if self.json {
            let v = serde_json::json!({
                "level": "WARN",
                "target": "hato::logging",
                "fields": {"message": "log line cut", "bytes": buf.len(), "head": head(1024)},
            });
            format!("{v}\n")
        } else {
            // Room for the note, so that the line stays within MAX_LINE.
            format!(
                "{} … [log line cut: {} bytes]\n",
                head(MAX_LINE - 64),
                buf.len()
            )
        };
        self.inner.write_all(line.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// How often the lines held back are summed up in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Site {
    target: String,
    line: u32,
    window: Instant,
    in_window: u32,
    held_back: u64,
}

/// The per-site counters; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct FloodGuard {
    sites: Arc<Mutex<HashMap<u64, Site>>>,
}

impl FloodGuard {
    /// Whether one more line from this site may be written now.
    fn admit(&self, meta: &Metadata<'_>) -> bool {
        // Debug and trace are off unless asked for, and then wanted whole.
        if *meta.level() > Level::INFO {
            return true;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        meta.target().hash(&mut h);
        meta.line().hash(&mut h);
        meta.level().hash(&mut h);
        let now = Instant::now();
        let mut sites = self.sites.lock().unwrap();
        let site = sites.entry(h.finish()).or_insert_with(|| Site {
            target: meta.target().to_owned(),
            line: meta.line().unwrap_or(0),
            window: now,
            in_window: 0,
            held_back: 0,
        });
        if now.duration_since(site.window) >= Duration::from_secs(1) {
            site.window = now;
            site.in_window = 0;
        }
        site.in_window += 1;
        if site.in_window <= PER_SECOND {
            true
        } else {
            site.held_back += 1;
            false
        }
    }

    /// The sites that held lines back since the last call, and how many.
    pub fn take_held_back(&self) -> Vec<(String, u32, u64)> {
        let mut sites = self.sites.lock().unwrap();
        let mut out: Vec<_> = sites
            .values_mut()
            .filter(|s| s.held_back > 0)
            .map(|s| (s.target.clone(), s.line, std::mem::take(&mut s.held_back)))
            .collect();
        // Sites that only ever logged a few lines need no memory.
        sites.retain(|_, s| s.held_back > 0 || s.in_window >= PER_SECOND);
        out.sort_by_key(|s| std::cmp::Reverse(s.2));
        out
    }

    /// Logs, one line a site, what was held back; forever, every
    /// [`SUMMARY_EVERY`].
    pub async fn summarise(self) {
        let mut tick = tokio::time::interval(SUMMARY_EVERY);
        tick.tick().await;
        loop {
            tick.tick().await;
            for (target, line, held_back) in self.take_held_back().into_iter().take(20) {
                tracing::warn!(
                    site = %format!("{target}:{line}"),
                    held_back,
                    "log lines held back (more than {PER_SECOND} a second from one place)"
                );
            }
        }
    }
}

impl<S> Filter<S> for FloodGuard {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        !meta.is_event() || self.admit(meta)
    }

    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> Interest {
        // Decided per event: the answer changes with the rate.
        Interest::sometimes()
    }

    /// The guard lets every level through, so the hint is HATO_LOG's
    /// alone. Without a hint the combined filter had none either, and the
    /// `log` crate's max level stayed at TRACE: every `debug!`/`trace!` in
    /// webrtc-rs became a record that tracing then dropped, a visible share
    /// of the server's CPU during a connect storm.
    fn max_level_hint(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        Some(tracing_subscriber::filter::LevelFilter::TRACE)
    }
}

/// Installs hato's logging: lines on stdout, text or JSON (`format`),
/// `HATO_LOG` (an EnvFilter; default `hato=info,warn`) choosing what, the
/// flood guard capping how often. Returns the guard, whose summaries the
/// caller runs.
pub fn init(format: crate::config::LogFormat) -> FloodGuard {
    let guard = FloodGuard::default();
    let env =
        EnvFilter::try_from_env("HATO_LOG").unwrap_or_else(|_| EnvFilter::new("hato=info,warn"));
    let filter = tracing_subscriber::filter::FilterExt::and(env, guard.clone());
    let json = format == crate::config::LogFormat::Json;
    let writer = move || MaxLine {
        inner: std::io::stdout(),
        json,
    };
    let layer = match format {
        crate::config::LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_writer(writer).boxed()
        }
        crate::config::LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .init();
    guard
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_site_is_capped_and_its_excess_counted() {
        let guard = FloodGuard::default();
        let writes = Arc::new(Mutex::new(0usize));
        let counted = writes.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || {
                    *counted.lock().unwrap() += 1;
                    std::io::sink()
                })
                .with_filter(guard.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1000 {
                tracing::warn!("the same line");
            }
            for _ in 0..5 {
                tracing::warn!("another line");
            }
            for _ in 0..1000 {
                tracing::debug!("debug is never capped");
            }
        });
        assert_eq!(*writes.lock().unwrap(), PER_SECOND as usize + 5 + 1000);
        let held = guard.take_held_back();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].2, 1000 - u64::from(PER_SECOND));
        assert!(guard.take_held_back().is_empty());
    }

    #[test]
    fn long_lines_are_cut_and_json_stays_json() {
        use std::io::Write;
        let written = |line: &[u8], json: bool| {
            let mut out = Vec::new();
            MaxLine {
                inner: &mut out,
                json,
            }
            .write_all(line)
            .unwrap();
            out
        };
        let long = format!("{}\n", "é".repeat(MAX_LINE));
        let text = String::from_utf8(written(long.as_bytes(), false)).unwrap();
        assert!(text.len() <= MAX_LINE, "{}", text.len());
        assert!(text.ends_with(&format!("[log line cut: {} bytes]\n", long.len())));
        let v: serde_json::Value = serde_json::from_slice(&written(long.as_bytes(), true)).unwrap();
        assert_eq!(v["fields"]["bytes"], long.len());
        assert_eq!(written(b"short\n", true), b"short\n");
    }
}
