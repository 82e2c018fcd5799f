//! Reading a server-sent-events body from an upstream, event by event, whatever the network
//! chunking (the WHATWG rules: `\n` or `\r\n` line ends, `data:` lines joined by newlines,
//! `event:` names, `:` comments, a blank line ending an event).
//!
//! Hand-rolled (about 60 lines) because the crates for it are client libraries with their own
//! HTTP stack or reconnection logic; here the bytes come from reqwest and a reconnect would
//! be wrong (a failed stream fails over or ends with an error event).

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` name, if any.
    pub(crate) event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub(crate) data: String,
}

/// Incremental parser: push bytes as they arrive, take the complete events.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
}

/// Longest line accepted; an upstream sending more without a line end is not speaking SSE.
const MAX_LINE: usize = 16 * 1024 * 1024;

impl SseParser {
    /// Adds bytes; returns the events they complete. `Err` when the bytes cannot be SSE
    /// (a line that is not UTF-8 or absurdly long).
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + pos;
            let raw = &self.buf[start..end];
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = std::str::from_utf8(raw)
                .map_err(|_| "an event stream line is not UTF-8".to_owned())?
                .to_owned();
            start = end + 1;
            if let Some(event) = self.line(&line) {
                out.push(event);
            }
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            return Err("an event stream line is longer than 16 MiB".into());
        }
        Ok(out)
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            if self.data.is_empty() && self.event.is_none() {
                return None;
            }
            return Some(SseEvent {
                event: self.event.take(),
                data: std::mem::take(&mut self.data).join("\n"),
            });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => self.data.push(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            _ => {}
        }
        None
    }

    /// True when bytes of an unfinished event are still buffered (a stream that ends here
    /// was cut short).
    pub(crate) fn is_mid_event(&self) -> bool {
        !self.buf.is_empty() || !self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_across_chunks_come_out_whole() {
        let text = b"event: message_start\r\ndata: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n";
        for split in 0..text.len() {
            let mut p = SseParser::default();
            let mut events = p.push(&text[..split]).unwrap();
            events.extend(p.push(&text[split..]).unwrap());
            assert_eq!(events.len(), 3, "split at {split}");
            assert_eq!(events[0].event.as_deref(), Some("message_start"));
            assert_eq!(events[0].data, "{\"a\":1}");
            assert_eq!(events[1].data, "line1\nline2");
            assert_eq!(events[2].data, "[DONE]");
            assert!(!p.is_mid_event());
        }
    }

    #[test]
    fn a_cut_stream_is_noticed_and_binary_is_refused() {
        let mut p = SseParser::default();
        p.push(b"data: {\"partial\"").unwrap();
        assert!(p.is_mid_event());
        let mut p = SseParser::default();
        assert!(p.push(b"data: \xff\xfe\n\n").is_err());
    }
}
